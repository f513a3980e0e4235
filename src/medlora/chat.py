"""Terminal chat: streamed tokens, multi-turn history through the template, a few slash commands."""

from __future__ import annotations

import dataclasses
import sys
import threading

from medlora import DISCLAIMER
from medlora.config import GenerationArgs
from medlora.errors import ConfigError
from medlora.generate import Generator

HELP = "commands: /reset (forget the conversation), /settings key=value ..., /exit"


def apply_settings(gen: GenerationArgs, spec: str) -> GenerationArgs:
    """`temperature=0.3 max_new_tokens=64` → a new GenerationArgs (sampling turns on with a temperature)."""
    types = {f.name: f.type for f in dataclasses.fields(GenerationArgs)}
    changes = {}
    for pair in spec.split():
        key, _, value = pair.partition("=")
        if key not in types or not value:
            raise ValueError(f"unknown setting {pair!r}; known: {', '.join(types)}")
        kind = type(getattr(gen, key))
        try:
            changes[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"{key} takes a {kind.__name__}, got {value!r}") from None
    if "temperature" in changes and "do_sample" not in changes:
        changes["do_sample"] = changes["temperature"] > 0
    return dataclasses.replace(gen, **changes)


def chat_loop(generator: Generator, gen: GenerationArgs, multi_turn: bool = True,
              read=input, write=sys.stdout.write) -> None:
    """Read questions until /exit or end of input; Ctrl-C stops the current answer, not the program."""
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
                gen = apply_settings(gen, line[len("/settings"):])
                write(f"[settings] {gen}\n")
            except (ValueError, ConfigError) as exc:
                write(f"[settings] {exc}; settings unchanged\n")
            continue
        if line.startswith("/"):
            write(f"[unknown command] {HELP}\n")
            continue
        found = generator.lookup(line, history=history)
        if found is not None:  # the facts the answer is to rest on, before it
            facts = found.text() or generator.template.no_knowledge
            write("知识> " + facts.replace("\n", "\n      ") + "\n")
        answer = _stream_answer(generator, generator.build_prompt(line, history=history, retrieved=found), gen, write)
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
    return "".join(pieces).strip()
