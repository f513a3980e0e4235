"""Terminal chat: streamed tokens, multi-turn history through the template, a few slash commands."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading

from medlora import DISCLAIMER
from medlora.config import GenerationArgs, str2bool
from medlora.errors import ConfigError
from medlora.generate import Generator
from medlora.turns import Turn

HELP = "commands: /reset (forget the conversation), /settings key=value ..., /exit"
SETTINGS = {f.name: f for f in dataclasses.fields(GenerationArgs)}


def apply_settings(gen: GenerationArgs, spec: str) -> GenerationArgs:
    """`temperature=0.3 max_new_tokens=64` → a new GenerationArgs (sampling turns on with a temperature); a bad
    name or value is a ValueError or ConfigError, and `gen` stays as it was."""
    changes = {}
    for pair in spec.split():
        key, _, value = pair.partition("=")
        if key not in SETTINGS:
            raise ValueError(f"unknown setting {key[:40]!r}; known: {', '.join(SETTINGS)}")
        changes[key] = setting_value(key, value)
    if "temperature" in changes and "do_sample" not in changes:
        changes["do_sample"] = changes["temperature"] > 0
    changed = dataclasses.replace(gen, **changes)
    check_streamable(changed)
    return changed


def setting_value(key: str, text: str):
    """A /settings value read as the command line reads the flag `--key`: a boolean by config.str2bool (true/false,
    1/0, yes/no, on/off), a number by its default's type; anything else is a ValueError, never a silent default."""
    kind = type(SETTINGS[key].default)
    try:
        return str2bool(text) if kind is bool else kind(text)
    except (ValueError, argparse.ArgumentTypeError):
        expected = {bool: "true or false", int: "an int"}.get(kind, f"a {kind.__name__}")
        raise ValueError(f"{key} takes {expected}, got {text[:40]!r}") from None


def check_streamable(gen: GenerationArgs) -> None:
    """Chat streams each answer token by token, which beam search cannot do (it settles on its best beam only at the
    end): refuse it in one line rather than fail in the middle of the first answer."""
    if gen.num_beams > 1:
        raise ConfigError(f"--num_beams {gen.num_beams}: chat streams its answers, which needs --num_beams 1 (beam "
                          f"search: medlora infer)")


def chat_loop(generator: Generator, gen: GenerationArgs, multi_turn: bool = True,
              read=input, write=sys.stdout.write) -> None:
    """Read questions until /exit or end of input; Ctrl-C stops the current answer, not the program."""
    check_streamable(gen)
    generator.prompt_room(gen)  # a --max_new_tokens past the context: one line before the chat starts
    write(f"{DISCLAIMER}\n{HELP}\n")
    history: list[tuple[str, str]] = []
    while True:
        try:
            line = read("\n问题> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            write("[conversation reset]\n")
            continue
        if line.startswith("/settings"):
            try:
                changed = apply_settings(gen, line[len("/settings"):])
                generator.prompt_room(changed)
                gen = changed
                write(f"[settings] {gen}\n")
            except (ValueError, ConfigError) as exc:
                write(f"[settings] {exc}; settings unchanged\n")
            continue
        if line.startswith("/"):
            write(f"[unknown command] {HELP}\n")
            continue
        prompt, found = generator.prepare(Turn(line, history=tuple(history)))
        if found is not None:  # the facts the answer is to rest on, before it
            facts = found.text() or generator.template.no_knowledge
            write("知识> " + facts.replace("\n", "\n      ") + "\n")
        answer = _stream_answer(generator, prompt, gen, write)
        if multi_turn:
            history.append((line, answer))


def _stream_answer(generator: Generator, prompt: str, gen: GenerationArgs, write) -> str:
    stop = threading.Event()
    pieces = []
    write("回答> ")
    try:
        for piece in generator.stream(prompt, gen, stop_event=stop):
            pieces.append(piece)
            write(piece)
            if hasattr(sys.stdout, "flush"):
                sys.stdout.flush()
    except KeyboardInterrupt:
        stop.set()
        write(" [stopped]")
    write("\n")
    return "".join(pieces)  # the cutter's pieces: stripped already, also when Ctrl-C cut them short
