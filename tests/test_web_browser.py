"""The chat and status pages in a real browser (Debian's chromium, headless, driven by Playwright)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from molink_swarm.models import DEFAULT_MODEL_ALIAS
from tests.conftest import local_answer

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"

# Records the assistant's text each time the page changes it: proof that tokens arrive one by one.
RECORD_TEXT_LENGTHS = """() => {
  window.textLengths = [];
  new MutationObserver(() => {
    const last = [...document.querySelectorAll('.msg.assistant .text')].pop();
    if (last) window.textLengths.push(last.textContent.length);
  }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup.sh does it with apt-get)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    yield page
    context.close()


def set_sampling(page, **values: str) -> None:
    """Open the settings panel like a visitor and fill in its fields (by element id)."""
    if not page.eval_on_selector("#settings", "d => d.open"):
        page.click("#settings summary")
    for field, value in values.items():
        page.fill(f"#{field.replace('_', '-')}", value)


def ask(page, question: str) -> None:
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")


def test_chat_streams_the_answer_token_by_token_and_keeps_history(page, smollm2_web, smollm2, tmp_path):
    _source, tokenizer, local = smollm2
    page.goto(smollm2_web)
    page.wait_for_selector("#model option", state="attached")
    set_sampling(page, temperature="0", max_tokens="40")  # greedy: the answer must be the local one
    page.evaluate(RECORD_TEXT_LENGTHS)
    question = "What is the capital of France? Answer in one sentence."
    ask(page, question)
    page.wait_for_selector(".msg.assistant[data-state=streaming]", timeout=30_000)
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=180_000)
    answer = page.inner_text(".msg.assistant .text")
    assert answer == local_answer(local, tokenizer, [{"role": "user", "content": question}], max_new_tokens=40)
    lengths = page.evaluate("window.textLengths")
    growing = [n for i, n in enumerate(lengths) if n and (i == 0 or n > lengths[i - 1])]
    assert len(growing) >= 4, f"the answer did not stream: text lengths seen {lengths}"
    assert page.is_hidden("#banner")  # every block is served
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

    page.reload()  # the conversation lives in the browser
    page.wait_for_selector(".msg.assistant")
    assert page.inner_text(".msg.user .text") == question
    assert page.inner_text(".msg.assistant .text") == answer
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0


def test_stop_button_ends_the_answer_and_the_generation(page, smollm2_web):
    page.goto(smollm2_web)
    page.wait_for_selector("#model option", state="attached")
    set_sampling(page, max_tokens="190")
    ask(page, "Write a long story about a dragon who learns to cook.")
    page.wait_for_function("() => Number(document.querySelector('.msg.assistant')?.dataset.chunks || 0) >= 3", timeout=120_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]", timeout=10_000)
    text = page.inner_text(".msg.assistant .text")
    assert text
    time.sleep(1.5)
    assert page.inner_text(".msg.assistant .text") == text  # nothing more arrives
    assert page.is_visible("#send") and page.is_hidden("#stop")
    deadline = time.monotonic() + 30  # and the app stopped generating for it
    while _metric(smollm2_web, "molink_web_active_generations") != 0:
        assert time.monotonic() < deadline, "the generation went on after stop"
        time.sleep(0.5)


def test_status_page_shows_every_block_covered(page, smollm2_web, tmp_path):
    page.goto(smollm2_web + "status")
    page.wait_for_selector(".model .all-covered", timeout=30_000)
    assert page.inner_text(".model .all-covered") == "All 30 blocks are served."
    assert page.locator(".model .blocks").first.locator("span.missing").count() == 0
    assert page.locator("tr.server.online").count() == 2
    held = [page.locator("tr.server").nth(i).locator("span.held").count() for i in range(2)]
    assert held == [15, 15]
    page.screenshot(path=str(tmp_path / "status.png"), full_page=True)


@pytest.fixture(scope="module")
def half_swarm_web(module_swarm, smollm2) -> str:
    """A swarm that serves only blocks 0:15 of 30, with the web app in front."""
    swarm = module_swarm(DEFAULT_MODEL_ALIAS, ["0:15"])
    _process, url = swarm.start_web("--wait-for-blocks", "1")
    return url


def test_missing_blocks_show_a_banner_and_a_clear_api_error(page, half_swarm_web, tmp_path):
    page.goto(half_swarm_web)
    page.wait_for_selector("#banner:not([hidden])", timeout=30_000)
    banner = page.inner_text("#banner")
    assert "lacks blocks 15:30" in banner and "molink-swarm join --model" in banner and "--blocks 15:30 --initial-peers /ip4/" in banner
    ask(page, "Hello?")
    page.wait_for_selector(".msg.assistant[data-state=error]", timeout=60_000)
    assert "molink-swarm join" in page.inner_text(".msg.assistant .error")
    page.screenshot(path=str(tmp_path / "missing.png"), full_page=True)

    page.goto(half_swarm_web + "status")
    page.wait_for_selector(".model .missing-blocks", timeout=30_000)
    assert "Missing blocks: 15:30" in page.inner_text(".model .missing-blocks")
    assert page.locator(".model .blocks").first.locator("span.missing").count() == 15

    request = urllib.request.Request(
        half_swarm_web + "v1/chat/completions",
        data=json.dumps({"model": DEFAULT_MODEL_ALIAS, "messages": [{"role": "user", "content": "Hi"}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code == 503
    assert "blocks 15:30" in json.loads(error.value.read())["error"]["message"]


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "metrics", timeout=30) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")

