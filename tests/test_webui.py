"""`medlora webui` in a real browser: headless Chromium (Playwright) against the page served on loopback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, TINY_RECORDS, running_medlora
from medlora import DISCLAIMER

CHROMIUM = os.environ.get("MEDLORA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "tests" / "artifacts"
DOCS_IMG = REPO / "docs" / "img" / "webui.png"
STARTUP_SECONDS = 240  # model + gradio import on a busy 2-core machine

playwright_api = pytest.importorskip("playwright.sync_api",
                                     reason="playwright is not installed (pip install playwright)")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)
pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[web]')")


@pytest.fixture(scope="module")
def webui(tiny_model, tiny_adapter, tmp_path_factory):
    """The page served by `medlora webui` in its own process; yields its URL."""
    log = tmp_path_factory.mktemp("webui") / "server.log"
    args = ["webui", "--base_model", tiny_model, "--lora_weights", str(tiny_adapter), "--dtype", "fp32"]
    with running_medlora(args, log, ready_path="/", seconds=STARTUP_SECONDS) as url:
        yield url + "/"


@pytest.fixture(scope="module")
def page(webui):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        hosts = set()
        page.on("request", lambda request: hosts.add(request.url.split("/")[2]))
        page.goto(webui)
        page.get_by_text(DISCLAIMER).wait_for()
        yield page
        browser.close()
        assert hosts == {webui.split("/")[2]}, f"the page contacted other hosts: {hosts}"


# Every text the chat box shows while an answer streams in, recorded in the page.
RECORD_CHAT = """() => {
  window.chatTexts = [];
  const box = document.querySelector('#chatbot');
  new MutationObserver(() => window.chatTexts.push(box.innerText))
    .observe(box, {childList: true, subtree: true, characterData: true});
}"""


def test_chat_streams_the_memorised_answer(page):
    expect = playwright_api.expect
    question, answer = TINY_RECORDS[0]["instruction"], TINY_RECORDS[0]["output"]
    page.locator("#chatbot").wait_for(timeout=60_000)  # a loaded machine renders the page late
    page.evaluate(RECORD_CHAT)
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    expect(page.locator("#chatbot")).to_contain_text(answer, timeout=120_000)
    texts = page.evaluate("window.chatTexts")
    partial = [t for t in texts if question in t and answer not in t and any(answer[:k] in t for k in (1, 2, 3))]
    assert partial, "the answer appeared all at once, not streamed"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)
    if os.environ.get("MEDLORA_UPDATE_DOCS_IMG"):  # refresh the README's picture on request only
        DOCS_IMG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ARTIFACTS / "webui.png", DOCS_IMG)


def test_side_by_side_answers_from_base_and_tuned(page):
    expect = playwright_api.expect
    record = TINY_RECORDS[1]
    page.get_by_role("tab", name="对比 · base vs tuned").click()
    page.locator("#compare-question textarea").fill(record["instruction"])
    page.locator("#compare").click()
    expect(page.locator("#tuned-answer textarea")).to_have_value(record["output"], timeout=120_000)
    expect(page.locator("#base-answer textarea")).not_to_have_value("", timeout=120_000)
    assert page.locator("#base-answer textarea").input_value() != record["output"]  # the adapter was off
    page.screenshot(path=str(ARTIFACTS / "webui-compare.png"), full_page=True)


@pytest.mark.slow  # a second web server (17 s): `make test-slow`; knowledge_markdown is tested in make test
def test_the_facts_used_are_shown_under_the_answer(page, tiny_model, knowledge_adapter, tmp_path):
    """A knowledge-tuned adapter (tests/conftest.py, knowledge_adapter): the entries retrieved for the question
    appear under the chat, in the page a user sees (a second page of the module's browser)."""
    expect = playwright_api.expect
    args = ["webui", "--base_model", tiny_model, "--lora_weights", str(knowledge_adapter), "--dtype", "fp32",
            "--max_new_tokens", "4"]
    with running_medlora(args, tmp_path / "server.log", ready_path="/", seconds=STARTUP_SECONDS) as url:
        second = page.context.browser.new_page(viewport={"width": 1100, "height": 900})
        second.goto(url + "/")
        second.locator("#chatbot").wait_for(timeout=60_000)
        second.locator("#question textarea").fill("青岚热用什么药？")
        second.locator("#send").click()
        expect(second.locator("#knowledge")).to_contain_text("青岚热·常用药物：甲泊韦", timeout=120_000)
        second.close()
