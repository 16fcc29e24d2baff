"""The web app (`molink-swarm web`) as a real process over a real swarm of SmolLM2: the official `openai` client,
raw HTTP for limits and errors, metrics; the browser tests live in test_web_browser.py."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.error
import urllib.request

import openai
import pytest

from molink_swarm.models import DEFAULT_MODEL_ALIAS
from tests.conftest import WEB_MAX_NEW_TOKENS, local_answer

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = WEB_MAX_NEW_TOKENS
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_models_list_names_the_served_model(client, model_name):
    assert [m.id for m in client.models.list()] == [model_name]


def test_chat_completion_is_the_local_greedy_answer(client, smollm2, model_name):
    _source, tokenizer, local = smollm2
    reply = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=32, temperature=0)
    expected = local_answer(local, tokenizer, QUESTION, max_new_tokens=32)
    assert reply.choices[0].message.content == expected
    assert "Paris" in expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert 0 < reply.usage.completion_tokens <= 32


def test_streamed_chat_arrives_in_pieces_and_equals_the_whole(client, model_name):
    kwargs = dict(model=DEFAULT_MODEL_ALIAS, messages=QUESTION, max_tokens=24, temperature=0)  # an alias works too
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        assert chunk.model == model_name
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == whole
    assert len([p for p in pieces if p]) > 3  # token by token, not one block at the end
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 3


def test_text_completion_continues_the_prompt_like_local_generate(client, smollm2, model_name):
    _source, tokenizer, local = smollm2
    prompt = "The three primary colors are"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = local.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    reply = client.completions.create(model=model_name, prompt=prompt, max_tokens=16, temperature=0)
    assert reply.choices[0].text == tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_name, prompt=prompt, max_tokens=16, temperature=0, stream=True
    ) if c.choices)
    assert streamed == reply.choices[0].text


def test_stop_string_cuts_the_answer_before_it(client, model_name):
    full = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=32, temperature=0)
    text = full.choices[0].message.content
    assert "Paris" in text
    cut = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=32, temperature=0, stop=["Paris"])
    assert cut.choices[0].message.content == text[: text.index("Paris")]
    assert cut.choices[0].finish_reason == "stop"


def test_invalid_requests_get_openai_style_errors(client, model_name):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_name, messages=QUESTION, temperature=7)
    assert error.value.status_code == 400
    assert "temperature" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=MAX_NEW_TOKENS + 1)
    assert f"at most {MAX_NEW_TOKENS}" in error.value.message
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model=model_name, messages=QUESTION, n=2)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)


def test_malformed_and_oversized_bodies_get_clear_4xx(web_url):
    status, reply = _post(web_url + "v1/chat/completions", b"{not json")
    assert status == 400 and reply["error"]["message"] == "The request body must be JSON"
    status, reply = _post(web_url + "v1/chat/completions", {"model": "x"})
    assert status == 400 and "messages" in reply["error"]["message"]
    huge = {"model": DEFAULT_MODEL_ALIAS, "messages": [{"role": "user", "content": "a" * 300_000}]}
    status, reply = _post(web_url + "v1/chat/completions", huge)
    assert status == 413 and "too large" in reply["error"]["message"]
    long_prompt = {"model": DEFAULT_MODEL_ALIAS, "messages": [{"role": "user", "content": "word " * 3000}]}
    status, reply = _post(web_url + "v1/chat/completions", long_prompt)
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert json.loads(_get(web_url + "healthz"))["ok"]  # and the app keeps serving


def test_a_client_gets_429_over_its_concurrent_sessions_and_others_are_served(web_url, client, model_name):
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    streams = [
        client.chat.completions.create(model=model_name, messages=story, max_tokens=MAX_NEW_TOKENS, stream=True)
        for _ in range(2)
    ]
    try:
        for stream in streams:
            next(iter(stream))  # both are generating now
        with pytest.raises(openai.RateLimitError) as error:
            client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=4)
        assert "At most 2 generations at once" in error.value.message
    finally:
        for stream in streams:
            stream.close()
    # Closing the streams stops their generations: the client's slots free up and the app is idle again.
    deadline = time.monotonic() + 60
    while _metric(web_url, "molink_web_active_generations") != 0.0:
        assert time.monotonic() < deadline, "closed streams kept generating"
        time.sleep(0.5)
    assert client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=4).choices[0].message.content


def test_concurrent_requests_all_complete_with_their_own_answers(web_url, smollm2, model_name):
    _source, tokenizer, local = smollm2
    questions = ["What is 2+2?", "Name a color.", "What is the capital of Italy?"]
    clients = [openai.OpenAI(base_url=web_url + "v1", api_key="unused", max_retries=0, timeout=300) for _ in questions]

    def ask(pair):
        c, q = pair
        return c.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": q}], max_tokens=12, temperature=0
        ).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        # Same client address for all three: the per-client limit (2) makes one of them wait its turn or be
        # refused; the refused one retries once its sibling finished.
        answers = list(pool.map(lambda pair: _retry_429(lambda: ask(pair)), zip(clients, questions)))
    for question, answer in zip(questions, answers):
        assert answer == local_answer(local, tokenizer, [{"role": "user", "content": question}], max_new_tokens=12)


def test_metrics_count_requests_and_tokens(web_url):
    text = _get(web_url + "metrics")
    assert re.search(r'molink_web_requests_total\{endpoint="/v1/chat/completions",status="200"\} [1-9]', text)
    assert _metric(web_url, "molink_web_completion_tokens_total") > 10
    assert "molink_web_first_token_seconds_bucket" in text


def test_swarm_json_shows_full_coverage(web_url, model_name):
    swarm = json.loads(_get(web_url + "api/v1/swarm"))
    (model,) = swarm["models"]
    assert model["served_here_as"] == model_name and model["num_blocks"] == 30
    assert model["missing"] == "" and all(c >= 1 for c in model["coverage"])
    spans = sorted((s["start"], s["end"]) for s in model["servers"])
    assert spans == [(0, 15), (15, 30)]
    assert all(s["state"] == "online" and s["rtt_ms"] is not None for s in model["servers"])
    assert all(s["wire_dtype"] == "float32" for s in model["servers"])  # join's default --wire-dtype auto
    assert swarm["initial_peers"][0].startswith("/ip4/127.0.0.1/tcp/")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.read().decode()


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metric(web_url: str, name: str) -> float:
    text = _get(web_url + "metrics")
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _retry_429(call, attempts: int = 20):
    for _ in range(attempts - 1):
        try:
            return call()
        except openai.RateLimitError:
            time.sleep(1.0)
    return call()


def test_demo_serves_the_web_app_and_stops_cleanly(tmp_path):
    from molink_swarm.lab import spawn

    demo = spawn("demo", ["demo"], log_dir=tmp_path)
    try:
        url = demo.wait_for(r"Web demo online at (\S+)", 300).group(1)
        assert json.loads(_get(url + "healthz"))["ok"]
        swarm = json.loads(_get(url + "api/v1/swarm"))
        assert swarm["models"][0]["missing"] == ""
    finally:
        code = demo.stop(timeout=60)
    assert code == 0, demo.output()
