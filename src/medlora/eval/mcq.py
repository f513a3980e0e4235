"""Multiple choice: the option letter (A-E) an answer chooses and the one its golden answer gives.

Answers are free text, so `extract_choice` reads a choice from patterns tried in order (docs/evaluation.md,
"Multiple choice"); a record is multiple choice when its golden answer gives a letter (`golden_choice`).
"""

from __future__ import annotations

import re
import unicodedata

from medlora.vocab import ALONE, CLOSE, LETTER, LETTERS, MARK, OPEN, normalise, offered_letters, parse_options


# Tried in order; the first pattern that matches decides (and within it, the first hit).
_CHOICE_PATTERNS = [re.compile(p) for p in [
    # a last line `答案: B` decides, whatever the reasoning before it says ("正确答案为B族链球菌" names an option)
    rf"(?:^|\n)\s*(?:正确)?答案\s*[:：]\s*{OPEN}?\s*({LETTER}){CLOSE}?\s*[。.]?\s*$",
    # the answer is A / Answer: (B) / option C
    rf"(?i:answer|option)\s*(?i:is)?\s*[:：]?\s*{OPEN}?\s*({LETTER}){ALONE}",
    # 答案: A / 答案：B / 正确答案是C / 正确选项为 D / 答案应为（E）
    rf"(?:正确)?(?:答案|选项)\s*(?:应该|应)?\s*(?:是|为|选)?\s*[:：]?\s*{OPEN}?\s*({LETTER}){ALONE}",
    # 故选E / 应选 B / 选择C / 我选B
    rf"选(?:择)?\s*[:：]?\s*{OPEN}?\s*({LETTER}){ALONE}",
    # an answer that starts with its letter: "C", "A. 肝硬化", "(D) …", "B、…"
    rf"^\s*{OPEN}?\s*({LETTER})\s*(?:{MARK}|\s|$)",
    # B项 / C选项
    rf"(?<![A-Za-z])({LETTER})\s*(?:选)?项",
    # (D) anywhere
    rf"{OPEN}\s*({LETTER})\s*{CLOSE}",
    # 我认为是 C / 应该是B
    rf"是\s*({LETTER}){ALONE}",
]]


# A restated option list, `选项: 妇科(A)、儿科(B)、…。` (the built-in data's answers begin with one): it names every
# letter, so it chooses none; an answer cut off inside or right after it must not count as choosing (A).
_RESTATED = re.compile(rf"选项\s*[:：]\s*(?:[^、,，。\n]+?{OPEN}{LETTER}{CLOSE}\s*[、,，]?\s*){{2,}}[。.]?")


def _choice_by_option_text(answer: str, options: dict[str, str]) -> str | None:
    """The single option whose text the answer names (a longer option text wins over one it contains)."""
    said = normalise(answer)
    named = {letter: normalise(body) for letter, body in options.items() if normalise(body) and normalise(body) in said}
    named = {k: v for k, v in named.items() if not any(v != w and v in w for w in named.values())}
    return next(iter(named)) if len(named) == 1 else None


def extract_choice(answer: str, instruction: str = "", options: dict[str, str] | None = None) -> str | None:
    """The option letter (A-E) a free-text answer chooses, or None when it names none (or several)."""
    text = _RESTATED.sub(" ", unicodedata.normalize("NFKC", answer or "")).strip()
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1)
    options = {**parse_options(instruction), **(options or {})}
    return _choice_by_option_text(text, options) if options else None


def golden_option(golden: str) -> dict[str, str]:
    """{letter: text} when the golden answer is written as one option, e.g. `C. 肝硬化`."""
    text = unicodedata.normalize("NFKC", golden or "")
    match = re.match(rf"\s*{OPEN}?\s*({LETTER})\s*{MARK}\s*(?![a-z])(\S.*)", text)  # not "E. coli"
    return {match.group(1): match.group(2).splitlines()[0].strip()} if match else {}


def golden_choice(golden: str, instruction: str = "") -> str | None:
    """The golden option letter: `C`, `(C)`, `答案: C\\n解析: …`, `C. 肝硬化`; or, when the instruction lists options,
    the option the golden answer names. None for a record that is not multiple choice."""
    text = unicodedata.normalize("NFKC", golden or "").strip()
    strict = [rf"^{OPEN}?\s*({LETTER})\s*{CLOSE}?\s*[.．、]?$",
              rf"^(?:正确)?答案\s*(?:是|为)?\s*[:：]?\s*{OPEN}?\s*({LETTER}){ALONE}"]
    for pattern in strict:
        match = re.match(pattern, text)
        if match:
            return match.group(1)
    option = golden_option(text)
    if option:
        return next(iter(option))
    return extract_choice(text, instruction) if parse_options(instruction) else None


def mcq_invalid(row: dict, choice: str | None, found: list[str]) -> bool:
    """A multiple-choice answer that chooses no offered letter, or names a letter the question did not offer
    (`found`: the row's `leaks`)."""
    offered = offered_letters(row) or LETTERS
    return choice is None or choice not in offered or "unoffered_letter" in found
