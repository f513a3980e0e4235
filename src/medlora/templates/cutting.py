"""Where an answer ends in its text, and the cut there: one cutter for finished and for streamed answers.

An answer ends at the first of its markers: the template's section headers (`Template.stop_strings`; a model that
keeps going after its answer usually opens a new "### 问题:" block) and a request's `stop` strings. The answer is the
text before that marker, without leading or trailing whitespace. (EOS ends an answer too, but as a token: generation
stops there and the token is not decoded; medlora.batching and medlora.generate decide that.)

`Cutter.cut` takes a finished text; `Cutter.stream` takes the same text in pieces as they are generated and passes on
what can no longer belong to a marker, holding back what could be a marker's beginning (and trailing whitespace). For
any split of a text, the streamed pieces add up to what `cut` gives, and both say alike whether a marker cut it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Cutter:
    """Cuts an answer at the first of `markers` (empty ones are ignored, repeats dropped)."""

    markers: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "markers", tuple(dict.fromkeys(m for m in self.markers if m)))

    def also(self, stops: Iterable[str]) -> "Cutter":
        """This cutter with a request's stop strings added."""
        stops = tuple(stops)
        return Cutter((*self.markers, *stops)) if stops else self

    def cut(self, text: str) -> tuple[str, bool]:
        """Final mode: the answer in a finished `text` (stripped, up to the first marker), and whether a marker cut
        it."""
        text = text.strip()
        end = self._first_marker(text)
        return (text, False) if end is None else (text[:end].rstrip(), True)

    def stream(self, pieces: Iterable[str], on_cut: Callable[[], None] | None = None) -> Iterator[str]:
        """Streaming mode: pieces of the answer as the text's `pieces` come. Reaching a marker calls `on_cut` (e.g. to
        stop generation) and reads the rest of `pieces` without passing it on, so that a thread producing them can
        finish."""
        return strip_pieces(self._until_marker(strip_pieces(pieces), on_cut))

    def _first_marker(self, text: str) -> int | None:
        return min((i for i in (text.find(m) for m in self.markers) if i >= 0), default=None)

    def _until_marker(self, pieces: Iterable[str], on_cut: Callable[[], None] | None) -> Iterator[str]:
        """Pass text through until a marker appears; hold back what could be a marker's beginning."""
        pieces = iter(pieces)
        longest = max((len(m) for m in self.markers), default=0)
        pending = ""
        for piece in pieces:
            pending += piece
            end = self._first_marker(pending)
            if end is not None:
                head = pending[:end].rstrip()
                if head:
                    yield head
                if on_cut is not None:
                    on_cut()
                for _ in pieces:  # drain, so the producer can finish
                    pass
                return
            safe = len(pending)
            for size in range(min(longest - 1, len(pending)), 0, -1):
                if any(m.startswith(pending[-size:]) for m in self.markers):
                    safe = len(pending) - size
                    break
            if safe:
                yield pending[:safe]
                pending = pending[safe:]
        if pending.strip():
            yield pending.rstrip()


def strip_pieces(pieces: Iterable[str]) -> Iterator[str]:
    """Text pieces whose concatenation is that of `pieces`, stripped: no leading whitespace, and trailing
    whitespace held back until more text follows (so a stream adds up to exactly the finished answer)."""
    held, started = "", False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        text = held + piece
        body = text.rstrip()
        held = text[len(body):]
        if body:
            yield body
