"""The answer cutter (medlora.templates.cutting): a finished text and the same text streamed in any pieces give the
same answer, cut at the first marker (the template's section headers, a request's stop strings)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medlora.templates import load_template
from medlora.templates.cutting import Cutter

MED = load_template("med_template").cutter()


def streamed(cutter: Cutter, pieces: list[str]) -> tuple[str, bool]:
    """The streamed answer, and whether the cutter reported a cut."""
    cuts = []
    return "".join(cutter.stream(pieces, lambda: cuts.append(True))), bool(cuts)


def test_a_marker_split_across_pieces_is_held_back_and_cut():
    text = "多饮多尿。\n### 问题:\n又一个"
    for split in range(len(text) + 1):  # every place the marker (or the text before it) may be split
        assert streamed(MED, [text[:split], text[split:]]) == ("多饮多尿。", True)
    seen = list(MED.stream(["多饮多尿。\n##", "# 问", "题:", "又一个"]))
    assert "".join(seen) == "多饮多尿。" and not any("#" in piece for piece in seen)  # no marker prefix leaks out


def test_a_marker_prefix_that_is_not_a_marker_is_passed_on():
    seen = list(MED.stream(["答案 ##", "# 不是标题", "，继续"]))
    assert "".join(seen) == "答案 ### 不是标题，继续" == MED.cut("答案 ### 不是标题，继续")[0]


def test_a_stop_string_at_the_very_start_leaves_an_empty_answer():
    cutter = MED.also(["Q:"])
    assert cutter.cut("  Q: 下一个问题") == ("", True)
    assert streamed(cutter, [" ", " Q", ": 下一个问题"]) == ("", True)
    assert list(cutter.stream(["Q:", "abc"])) == []


def test_reaching_a_marker_stops_the_producer_and_drains_it():
    produced = []

    def producer():
        for piece in ["答案。", "### 问题:", "后面", "还有"]:
            produced.append(piece)
            yield piece

    stopped = []
    assert "".join(MED.stream(producer(), lambda: stopped.append(True))) == "答案。"
    assert stopped == [True] and len(produced) == 4  # drained: a generating thread can finish


def test_the_templates_cutter_and_a_requests_stop_strings():
    cutter = load_template("med_template").cutter(("科",))
    assert cutter.markers[-1] == "科" and set(MED.markers) < set(cutter.markers)
    assert cutter.cut("建议去神经内科就诊。") == ("建议去神经内", True)
    assert Cutter(("", "x", "x")).markers == ("x",)  # empty stop strings cut nothing
    assert Cutter().cut("  没有标记 \n") == ("没有标记", False)


TEXT = st.text(alphabet="ab #:\n问题", max_size=30)


@settings(max_examples=300, deadline=None)
@given(text=TEXT, cuts=st.lists(st.integers(0, 30), max_size=6),
       markers=st.lists(st.text(alphabet="ab #:\n问题", min_size=1, max_size=4), max_size=3))
def test_both_modes_give_the_same_answer_for_any_split(text, cuts, markers):
    cutter = Cutter(tuple(markers))
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert streamed(cutter, pieces) == cutter.cut(text)


@pytest.mark.parametrize("text", ["", "   ", "\n\n"])
def test_blank_text_is_an_empty_answer(text):
    assert MED.cut(text) == ("", False) and streamed(MED, [text]) == ("", False)


class CharTokenizer:
    """Each token is one character (its code point); 0 is EOS."""

    @staticmethod
    def decode(tokens, skip_special_tokens=True):
        return "".join(chr(t) for t in tokens)


def char_generator():
    from medlora.generate import Generator

    generator = object.__new__(Generator)  # only what to_answer and pieces read: no model
    generator.template, generator.tokenizer, generator.eos_ids = load_template("med_template"), CharTokenizer(), {0}
    return generator


@pytest.mark.parametrize("text,eos,stops,expected", [
    ("答案\n### 问题:又一个", False, (), ("答案", True, False)),
    ("答案\n### 问题:", True, (), ("答案", True, False)),  # padding after a marker may be EOS: not an EOS ending
    ("建议去神经内科就诊。", True, ("科",), ("建议去神经内", True, True)),  # a request's stop string, then EOS
    ("建议去神经内科就诊。", False, (), ("建议去神经内科就诊。", False, False)),  # max_new_tokens reached
])
def test_a_generated_answer_is_cut_as_its_stream_is(text, eos, stops, expected):
    """Generator.to_answer (generate, the server's whole answers) and Generator.pieces (stream, chat, the web page,
    the server's streams) cut the same tokens alike; `cut` and `ended_by_eos` give the server its finish_reason."""
    import threading

    generator = char_generator()
    tokens = [ord(c) for c in text] + ([0] if eos else [])
    answer = generator.to_answer(tokens, 0.0, stops)
    assert (answer.text, answer.cut, answer.ended_by_eos) == expected
    assert answer.n_tokens == len(text) + answer.ended_by_eos
    event = threading.Event()
    assert "".join(generator.pieces(iter(text), event, stops)) == answer.text
    assert event.is_set() == answer.cut
