"""One turn of a conversation to answer: the question (instruction and input), the earlier turns and the
conversation's own system text. Records from data files, chat lines, the server's messages and the web page's
questions all become a Turn before a prompt is built from it (`Generator.prepare`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
