"""`/v1/completions` with `logprobs` and `echo` over a real swarm of SmolLM2: what evaluation tools (lm-evaluation-harness's
`local-completions`) send to score text, checked against plain transformers on the same weights."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
import torch

pytestmark = pytest.mark.slow

TEXT = "The capital of France is Paris. Un café ☕ à Tōkyō costs 500 yen."
CONTINUATION = " The Eiffel Tower is in Paris."


def local_logprobs(local, ids: list[int]) -> torch.Tensor:
    """log_softmax of plain transformers' logits at every position of ``ids``: [len(ids), vocab]."""
    with torch.inference_mode():
        return torch.log_softmax(local(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_scores_every_prompt_token_like_local_transformers(client, smollm2, model_name):
    _source, tokenizer, local = smollm2
    ids = tokenizer(TEXT)["input_ids"]
    reply = client.completions.create(model=model_name, prompt=TEXT, echo=True, logprobs=1, max_tokens=0)
    (choice,) = reply.choices
    assert choice.text == TEXT and choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs.tokens == [tokenizer.decode([i]) for i in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts the first token
    expected = local_logprobs(local, ids)
    for position in range(1, len(ids)):
        assert logprobs.token_logprobs[position] == pytest.approx(float(expected[position - 1, ids[position]]), abs=1e-4)
        top = logprobs.top_logprobs[position]
        best = int(expected[position - 1].argmax())
        assert top[tokenizer.decode([best])] == pytest.approx(float(expected[position - 1, best]), abs=1e-4)
        assert len(top) in (1, 2)  # the likeliest token, and the actual one if it is another
    offsets = [start for start, _end in tokenizer(TEXT, return_offsets_mapping=True)["offset_mapping"]]
    assert logprobs.text_offset == offsets


def test_generated_tokens_are_the_greedy_ones_with_their_logprobs(client, smollm2, model_name):
    _source, tokenizer, local = smollm2
    prompt = "The three primary colors are"
    ids = tokenizer(prompt)["input_ids"]
    reply = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    (choice,) = reply.choices
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == reply.usage.completion_tokens == 8
    greedy = local.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    generated = greedy[0, len(ids) :].tolist()
    assert logprobs.tokens == [tokenizer.decode([t]) for t in generated]
    expected = local_logprobs(local, ids + generated)
    for step, token in enumerate(generated):
        row = expected[len(ids) + step - 1]
        assert logprobs.token_logprobs[step] == pytest.approx(float(row[token]), abs=1e-4)
        top = logprobs.top_logprobs[step]
        assert len(top) == 3 and max(top.values()) == logprobs.token_logprobs[step]  # greedy: the likeliest token
        assert list(top) == [tokenizer.decode([t]) for t in row.topk(3).indices.tolist()]
    assert logprobs.text_offset[0] == 0  # offsets into the reply's text, which here is the answer alone
    assert [choice.text[o:] for o in logprobs.text_offset] == ["".join(logprobs.tokens[i:]) for i in range(8)]


def test_logprobs_are_the_models_own_whatever_the_sampling(client, smollm2, model_name):
    _source, tokenizer, local = smollm2
    prompt = "Once upon a time"
    expected = local_logprobs(local, tokenizer(prompt)["input_ids"])[-1]
    reply = client.completions.create(model=model_name, prompt=prompt, max_tokens=1, temperature=1.8, top_p=0.9, logprobs=5)
    logprobs = reply.choices[0].logprobs
    top = logprobs.top_logprobs[0]
    for token in expected.topk(5).indices.tolist():  # not the distribution after temperature or top_p
        assert top[tokenizer.decode([token])] == pytest.approx(float(expected[token]), abs=1e-4)
    names = tokenizer.batch_decode([[i] for i in range(len(expected))])
    sampled = [i for i, name in enumerate(names) if name == logprobs.tokens[0]]
    assert any(float(expected[i]) == pytest.approx(logprobs.token_logprobs[0], abs=1e-4) for i in sampled)
    # And a prompt scores the same at any temperature.
    kwargs = dict(model=model_name, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    cold = client.completions.create(**kwargs, temperature=0).choices[0].logprobs
    hot = client.completions.create(**kwargs, temperature=1.7, top_p=0.5).choices[0].logprobs
    assert hot.token_logprobs[1:] == pytest.approx(cold.token_logprobs[1:], abs=1e-5)


def test_echo_with_generation_reports_prompt_then_answer(client, smollm2, model_name):
    _source, tokenizer, _local = smollm2
    prompt = "Water boils at"
    ids = tokenizer(prompt)["input_ids"]
    whole = client.completions.create(model=model_name, prompt=prompt, max_tokens=5, temperature=0)
    reply = client.completions.create(model=model_name, prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=0)
    (choice,) = reply.choices
    assert choice.text == prompt + whole.choices[0].text
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + reply.usage.completion_tokens
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])  # logprobs=0: the chosen token only
    assert logprobs.text_offset[len(ids)] == len(prompt)  # the answer starts where the echoed prompt ends
    # Without echo, the same answer's tokens have the same scores.
    plain = client.completions.create(model=model_name, prompt=prompt, max_tokens=5, temperature=0, logprobs=0)
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(logprobs.token_logprobs[len(ids) :], abs=1e-5)


def test_the_end_of_sequence_token_is_listed_but_not_shown(client, smollm2, model_name):
    _source, tokenizer, local = smollm2
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, return_dict=False
    )
    greedy = local.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert greedy[0, -1] == tokenizer.eos_token_id, "the reference answer should end by itself"
    reply = client.completions.create(model=model_name, prompt=ids, max_tokens=40, temperature=0, logprobs=1)
    (choice,) = reply.choices
    logprobs = choice.logprobs
    assert choice.finish_reason == "stop" and logprobs.tokens[-1] == tokenizer.eos_token
    assert "".join(logprobs.tokens[:-1]) == choice.text and logprobs.text_offset[-1] == len(choice.text)
    assert len(logprobs.tokens) == reply.usage.completion_tokens + 1  # usage counts what the text shows
    expected = local_logprobs(local, greedy[0].tolist())[-2, tokenizer.eos_token_id]
    assert logprobs.token_logprobs[-1] == pytest.approx(float(expected), abs=1e-4)


def test_token_id_prompts_and_lists_of_prompts_get_one_choice_each(client, smollm2, model_name):
    _source, tokenizer, _local = smollm2
    texts = [TEXT, "Hello world", "1 2 3 4"]
    alone = [
        client.completions.create(model=model_name, prompt=text, echo=True, logprobs=1, max_tokens=0).choices[0]
        for text in texts
    ]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    for prompt in (texts, ids):
        reply = client.completions.create(model=model_name, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        for choice, single in zip(reply.choices, alone):
            assert choice.text == single.text
            assert choice.logprobs.tokens == single.logprobs.tokens
            assert choice.logprobs.text_offset == single.logprobs.text_offset
            assert choice.logprobs.token_logprobs[1:] == pytest.approx(single.logprobs.token_logprobs[1:], abs=1e-5)
        assert reply.usage.prompt_tokens == sum(map(len, ids))
    one = client.completions.create(model=model_name, prompt=ids[0], echo=True, logprobs=1, max_tokens=0)
    assert one.choices[0].text == TEXT  # token ids echo as their text
    assert one.choices[0].logprobs.text_offset == alone[0].logprobs.text_offset


def test_streamed_logprobs_add_up_to_the_whole_reply(client, model_name):
    kwargs = dict(model=model_name, prompt="The sun rises in the", max_tokens=6, temperature=0, echo=True, logprobs=2)
    whole = client.completions.create(**kwargs).choices[0]
    text, tokens, token_logprobs, offsets, finish = "", [], [], [], None
    chunks = list(client.completions.create(**kwargs, stream=True))
    for chunk in chunks:
        (choice,) = chunk.choices
        text += choice.text
        finish = choice.finish_reason or finish
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            token_logprobs += choice.logprobs.token_logprobs
            offsets += choice.logprobs.text_offset
    assert text == whole.text and finish == whole.finish_reason
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert token_logprobs[0] is None and token_logprobs[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)
    assert len([c for c in chunks if c.choices[0].logprobs is not None]) >= 1 + 6  # the prompt, then token by token


def test_a_list_of_prompts_streams_each_choice_by_its_index(client, model_name):
    kwargs = dict(model=model_name, prompt=["The sky is", "Grass is"], max_tokens=4, temperature=0, logprobs=1)
    whole = client.completions.create(**kwargs)
    texts, tokens, finishes = ["", ""], [[], []], [None, None]
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
            tokens[choice.index] += choice.logprobs.tokens if choice.logprobs else []
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert texts == [c.text for c in whole.choices] and finishes == [c.finish_reason for c in whole.choices]
    assert tokens == [c.logprobs.tokens for c in whole.choices]


def test_lm_eval_harness_loglikelihood_request(web_url, smollm2, model_name):
    """What lm-evaluation-harness's local-completions sends for a loglikelihood request, parsed as it parses it."""
    _source, tokenizer, local = smollm2
    context, continuation = tokenizer(TEXT)["input_ids"], tokenizer(CONTINUATION)["input_ids"]
    payload = {
        "model": model_name,
        "prompt": [context + continuation],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    status, reply = _post(web_url + "v1/completions", payload)
    assert status == 200, reply
    (choice,) = reply["choices"]
    ctxlen = len(context)
    token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]  # the continuation's; the last is generated
    assert len(token_logprobs) == len(continuation)
    is_greedy = all(lp == max(top.values()) for lp, top in zip(token_logprobs, choice["logprobs"]["top_logprobs"][ctxlen:-1]))
    expected = local_logprobs(local, context + continuation)
    want = [float(expected[ctxlen + i - 1, token]) for i, token in enumerate(continuation)]
    assert sum(token_logprobs) == pytest.approx(sum(want), abs=1e-3)
    want_greedy = all(int(expected[ctxlen + i - 1].argmax()) == token for i, token in enumerate(continuation))
    assert is_greedy == want_greedy


def test_bad_logprobs_and_prompts_get_clear_400s_and_the_app_keeps_serving(web_url, client, model_name):
    with pytest.raises(openai.BadRequestError, match="0 to 5"):
        client.completions.create(model=model_name, prompt="Hi", logprobs=6, max_tokens=1)
    url = web_url + "v1/completions"
    bad = [
        ({"logprobs": -1}, "0 to 5"),
        ({"logprobs": True}, "logprobs"),
        ({"prompt": []}, "prompt is empty"),
        ({"prompt": [[]]}, "prompt is empty"),
        ({"prompt": [[1, 2], []]}, "prompt is empty"),
        ({"prompt": [1, 10**9]}, "not in the model's vocabulary"),
        ({"prompt": [-1]}, "not in the model's vocabulary"),
        ({"prompt": 5}, "list of token ids"),
        ({"prompt": ["a", 1]}, "list of token ids"),
        ({"prompt": ["a"] * 17}, "At most 16 prompts"),
        ({"max_tokens": -1}, "max_tokens"),
    ]
    for change, message in bad:
        status, reply = _post(url, {"model": model_name, "prompt": "Hi", "max_tokens": 1, **change})
        assert status == 400 and message in reply["error"]["message"], (change, reply)
    status, reply = _post(web_url + "v1/chat/completions", {"model": model_name, "messages": [{"role": "user", "content": "Hi"}], "logprobs": True})
    assert status == 400 and "/v1/completions" in reply["error"]["message"]
    reply = client.completions.create(model=model_name, prompt="Hi", echo=True, logprobs=5, max_tokens=1)
    assert reply.choices[0].text.startswith("Hi") and len(reply.choices[0].logprobs.tokens) == reply.usage.prompt_tokens + 1


def _post(url: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
