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
    # The untrained base model rambles until max_new_tokens (near all that its 2048-token context leaves beside the
    # prompt): the answer is still streaming when Ctrl-C comes.
    child = spawn_chat("--base_model", tiny_model, "--dtype", "fp32", "--max_new_tokens", "2000")
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


def test_settings_values_are_parsed_strictly_by_one_parser():
    """/settings reads a value as the command line reads its flag (config.str2bool for booleans): `maybe` is an
    error in the chat, not a silent false."""
    from medlora.chat import apply_settings
    from medlora.config import GenerationArgs
    from medlora.errors import ConfigError

    gen = GenerationArgs()
    assert apply_settings(gen, "do_sample=yes temperature=0.7").do_sample is True
    assert apply_settings(apply_settings(gen, "do_sample=1 temperature=0.7"), "do_sample=no").do_sample is False
    assert apply_settings(gen, "max_new_tokens=64 top_p=0.5").max_new_tokens == 64
    for spec, message in (("do_sample=maybe", "do_sample takes true or false, got 'maybe'"),
                          ("do_sample=", "do_sample takes true or false, got ''"),
                          ("max_new_tokens=1.5", "max_new_tokens takes an int, got '1.5'"),
                          ("colour=red", "unknown setting 'colour'")):
        with pytest.raises(ValueError, match=message):
            apply_settings(gen, spec)
    with pytest.raises(ConfigError, match="--num_beams 2: chat streams its answers"):
        apply_settings(gen, "num_beams=2")


def test_a_bad_setting_is_a_message_in_the_chat_and_the_chat_goes_on():
    from medlora.chat import chat_loop
    from medlora.config import GenerationArgs

    from types import SimpleNamespace

    from medlora.generate import Generator

    model = SimpleNamespace(context_length=64)  # no question is asked: only the context is needed of the model
    model.prompt_room = lambda gen: Generator.prompt_room(model, gen)
    lines = iter(["/settings do_sample=maybe", "/settings num_beams=3", "/settings max_new_tokens=60", "/exit"])
    written = []
    chat_loop(model, GenerationArgs(max_new_tokens=32), read=lambda _: next(lines), write=written.append)
    said = "".join(written)
    assert "[settings] do_sample takes true or false, got 'maybe'; settings unchanged" in said
    assert "[settings] --num_beams 3: chat streams its answers, which needs --num_beams 1" in said
    assert "[settings] --max_new_tokens 60: the model reads at most 64 tokens, prompt and answer together" in said


def test_chat_refuses_beam_search_in_one_line_before_loading_the_model(tiny_model, capsys):
    from medlora.cli import main

    assert main(["chat", "--base_model", tiny_model, "--num_beams", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == ["medlora chat: error: --num_beams 2: chat streams its answers, which needs --num_beams 1 (beam "
                   "search: medlora infer)"]
