"""`medlora chat` driven as a person would: a terminal (pty), typed lines, Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from conftest import REPO, TINY_RECORDS
from medlora import DISCLAIMER

pexpect = pytest.importorskip("pexpect")

PROMPT = "问题> "
TIMEOUT = 180  # model loading on a busy 2-core machine


def spawn_chat(*args: str):
    env = {**os.environ, "PYTHONUTF8": "1", "HF_HUB_OFFLINE": "1", "TERM": "dumb"}
    # A runner started in the background (`cmd &` in a script) ignores SIGINT, and its children inherit that:
    # Python then installs no KeyboardInterrupt handler and Ctrl-C does nothing. A terminal user's chat has it.
    child = pexpect.spawn(sys.executable, ["-m", "medlora.cli", "chat", *args], cwd=str(REPO), env=env,
                          encoding="utf-8", timeout=TIMEOUT, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact(DISCLAIMER)
    child.expect_exact(PROMPT)
    return child


def exit_chat(child) -> int:
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_chat_session(tiny_model, tiny_adapter):
    child = spawn_chat("--base_model", tiny_model, "--lora_weights", str(tiny_adapter), "--dtype", "fp32")
    try:
        child.sendline(TINY_RECORDS[0]["instruction"])
        child.expect_exact("回答> ")
        child.expect_exact(TINY_RECORDS[0]["output"])
        child.expect_exact(PROMPT)

        child.sendline("/settings temperature=0.3")
        child.expect_exact("[settings]")
        child.expect_exact("temperature=0.3")
        child.expect_exact(PROMPT)

        for bad, message in [("max_new_tokens=0", "--max_new_tokens must be at least 1"),
                             ("temperature=-1", "--temperature must be above 0 when sampling"),
                             ("top_p=abc", "top_p takes a float, got 'abc'")]:
            child.sendline(f"/settings {bad}")  # a bad value is reported and the chat goes on with the old settings
            child.expect_exact(f"[settings] {message}")
            child.expect_exact("settings unchanged")
            child.expect_exact(PROMPT)
        child.sendline(TINY_RECORDS[0]["instruction"])
        child.expect_exact("回答> ")
        child.expect_exact(PROMPT)

        child.sendline("/reset")
        child.expect_exact("[conversation reset]")
        child.expect_exact(PROMPT)
        assert exit_chat(child) == 0
    finally:
        child.close(force=True)


def test_ctrl_c_stops_the_answer_not_the_program(tiny_model):
    # The untrained base model rambles until max_new_tokens: the answer is still streaming when Ctrl-C comes.
    child = spawn_chat("--base_model", tiny_model, "--dtype", "fp32", "--max_new_tokens", "100000")
    try:
        child.sendline("头痛应该怎么办？")
        child.expect_exact("回答> ")
        child.expect(r"[^\n]{40}")  # some of the answer has been streamed
        child.send("\x03")
        child.expect_exact("[stopped]", timeout=60)
        child.expect_exact(PROMPT, timeout=60)
        assert child.isalive()
        assert exit_chat(child) == 0
    finally:
        child.close(force=True)
