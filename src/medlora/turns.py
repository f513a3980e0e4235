"""One turn of a conversation to answer: the question (instruction and input), the earlier turns and the
conversation's own system text. Records from data files, chat lines, the server's messages and the web page's
questions all become a Turn before a prompt is built from it (`Generator.prepare`).

Message order has one rule, `conversation_turns`, for data files' conversations (medlora.data) and the server's
messages (medlora.serve.engine), so a file trains on the turns a request with the same messages is answered from."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from medlora.errors import DataError
from medlora.vocab import question_text


@dataclass(frozen=True)
class Turn:
    instruction: str
    input: str = ""
    history: tuple[tuple[str, str], ...] = ()  # earlier (user, assistant) turns, oldest first
    system: str | None = None  # None: the template's (or the adapter's) system text

    @classmethod
    def of(cls, record: Mapping) -> "Turn":
        """The turn of a loaded record (medlora.data's fields: instruction, input, history, system)."""
        return cls(record["instruction"], record.get("input") or "",
                   tuple((user, answer) for user, answer in record.get("history") or ()), record.get("system"))

    @property
    def question(self) -> str:
        """The question as one text: the instruction, and the input on the next line when there is one."""
        return question_text({"instruction": self.instruction, "input": self.input})


def conversation_turns(messages: Iterable[tuple[str, str]]) -> tuple[str | None, list[str]]:
    """The one rule for message order: (role, text) messages, each role system, user or assistant, as (the system text
    or None, the texts of the user and assistant turns in turn, the user's first).

    System messages, wherever they stand, are joined by a newline into the system text, and consecutive messages of
    one role into one turn, as the Jinja and Ollama templates medlora exports join them (vLLM, llama.cpp and Ollama
    prompt a model with these; many models' own templates refuse such messages, and clients join them). A
    conversation without a user message, or whose first turn is the assistant's, is a DataError naming the message
    by its number (from 1)."""
    system, turns = [], []  # turns: [role, text], the roles alternating
    for number, (role, text) in enumerate(messages, start=1):
        if role == "system":
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        elif not turns and role != "user":
            raise DataError(f"turn {number}: the conversation starts with an {role} turn; it must start with the "
                            f"user's")
        else:
            turns.append([role, text])
    if not turns:
        raise DataError("the conversation has no user turn")
    return "\n".join(system) or None, [text for _, text in turns]
