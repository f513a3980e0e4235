"""`medlora bench` and medlora.benchmarks: loglik scores against a hand computation on tiny-qwen2 (batched or not),
the answer parser on hand-written answers, the file shapes and their one-line errors, the seeded sample, the
committed files' provenance, and that no committed benchmark question is in the training data."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import replace

import pytest

from conftest import REPO, write_jsonl
from medlora.benchmarks import (ANSWER_CUE, COMMITTED, REPO_DATA, Question, letter_continuation, load_subsets,
                                parse_answer, question_prompt, read_questions, resolve, result_row, score_loglik,
                                Subset, summarise)
from medlora.errors import ConfigError, DataError

# Our own made-up questions (not from any benchmark): two 4-option, one 5-option, of different lengths.
TOY = [
    {"question": "成人正常体温约为", "options": "(A) 35℃.\n(B) 37℃.\n(C) 39℃.\n(D) 41℃.", "answer": "(B)"},
    {"question": "下列哪项属于维生素？长题干用来让这一行比其他行更长一些，检验左侧填充不改变得分。",
     "options": {"A": "葡萄糖", "B": "维生素C", "C": "氯化钠", "D": "水", "E": "氧气"}, "answer": "B"},
    {"question": "心脏有几个腔？", "options": ["两个", "三个", "四个", "五个"], "answer": ["C"]},
]


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("bench") / "toy.jsonl", TOY)


@pytest.fixture(scope="module")
def generator(tiny_model):
    from medlora.generate import Generator

    return Generator.load(tiny_model, dtype="fp32")


def _by_hand(model, ids: list[int], cont: list[int]) -> float:
    """The summed log-probability of `cont` after `ids`: one unpadded forward pass over both, each continuation token
    read from the distribution of the position before it (only the last len(cont)+1 positions are projected onto the
    151k-token vocabulary: the full projection costs seconds per test)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids + cont]), logits_to_keep=len(cont) + 1).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)  # rows: positions len(ids)-1 …; row j predicts cont[j]
    return sum(float(logprobs[j, token]) for j, token in enumerate(cont))


def _by_hand_distribution(model, ids: list[int]):
    """The log-probabilities of the token after `ids`, from one unpadded forward pass over them."""
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def test_loglik_choice_is_the_argmax_of_hand_computed_letter_logprobs_batched_or_not(generator, toy_file):
    questions = read_questions(toy_file, "toy")
    tok, template = generator.tokenizer, generator.template
    one_by_one = score_loglik(generator, questions, batch_size=1)
    padded = score_loglik(generator, questions, batch_size=3)  # three lengths in one left-padded batch
    for q, alone, batched in zip(questions, one_by_one, padded):
        ids = tok(generator.build_prompt(question_prompt(q)) + ANSWER_CUE,
                  add_special_tokens=template.add_special_tokens)["input_ids"]
        letters = {letter: tok(letter_continuation(letter), add_special_tokens=False)["input_ids"]
                   for letter in q.options}
        assert all(len(cont) == 1 for cont in letters.values())  # one token each: the one-row-per-question path
        # a letter's log-probability is the prompt's last distribution at its token: one unpadded pass per question
        last = _by_hand_distribution(generator.model, ids)
        hand = {letter: float(last[cont[0]]) for letter, cont in letters.items()}
        assert alone["choice"] == batched["choice"] == max(hand, key=hand.get)
        for letter in q.options:
            assert alone["scores"][letter] == pytest.approx(hand[letter], abs=1e-4)
            assert batched["scores"][letter] == pytest.approx(hand[letter], abs=1e-4)


def test_multi_token_continuations_are_summed_and_padding_changes_nothing(generator):
    from medlora.loglik import continuation_logprobs

    tok = generator.tokenizer
    contexts = [tok(text)["input_ids"] for text in ("心脏有几个腔？答案:", "正常体温是多少？请回答。答案:")]
    conts = [[tok(text, add_special_tokens=False)["input_ids"] for text in (" 四个腔", " 两个", " C")],
             [tok(text, add_special_tokens=False)["input_ids"] for text in (" 三十七摄氏度左右", " B")]]
    assert max(len(c) for cs in conts for c in cs) > 1  # the general path, not only single tokens
    hand = [[_by_hand(generator.model, ctx, c) for c in cs] for ctx, cs in zip(contexts, conts)]
    scores = continuation_logprobs(generator.model, contexts, conts, tok.pad_token_id, batch_size=8)  # 5 rows, padded
    assert scores == [pytest.approx(h, abs=1e-4) for h in hand]


@pytest.mark.parametrize("answer, options, chosen", [
    # the demo adapter's trained form: the letter, then the fact; and the form before it (restated options first)
    ("答案: B。成人正常体温约为37℃，故选此项。", "ABCD", "B"),
    ("解析: 选项: 35℃(A)、37℃(B)、39℃(C)、41℃(D)。成人正常体温约为37℃，故选此项。\n选择: 37℃(B)\n答案: B", "ABCD", "B"),
    ("答案：BCD", "ABCDE", "BCD"),
    ("正确答案为B、D。", "ABCD", "BD"),
    ("故选AC", "ABCD", "AC"),
    ("B", "ABCD", "B"),
    ("C. 四个", "ABCD", "C"),
    ("心脏有四个腔。", "ABCD", "C"),  # the option text copied back
    ("解析: 选项: 35℃(A)、37℃(B)、", "ABCD", None),  # cut off inside the restated list: chooses nothing
    ("A. 两个\nB. 三个\nC. 四个\nD. 五个\n答案:\nA. 两个", "ABCD", None),  # a base model restating the options
    ("A. \nB. \nC. \nD.", "ABCD", None),
    ("A. 两个\nB. 三个\n答案: B", "ABCD", "B"),
    ("答案: E", "ABCD", None),  # a letter not offered
    ("我不确定。", "ABCD", None),
])
def test_parse_answer_on_hand_written_answers(answer, options, chosen):
    texts = {"A": "两个", "B": "三个", "C": "四个", "D": "五个", "E": "六个"}
    assert parse_answer(answer, {letter: texts[letter] for letter in options}) == chosen


def test_several_answers_are_right_only_as_the_exact_set():
    q = Question("toy", 1, "题", {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}, "BD", several=True)
    subset = Subset("toy", "toy.jsonl", 1, [q])
    rows = {"set": [result_row(q, parse_answer("答案：B、D", q.options))], "one": [result_row(q, "B")]}
    metrics = summarise([subset], rows, "loglik")
    assert metrics["accuracy"]["set"]["toy"]["accuracy"] == 1.0 and metrics["accuracy"]["one"]["toy"]["accuracy"] == 0
    assert metrics["sets"]["toy"]["chance"] == 0.0 and metrics["sets"]["toy"]["several_answers"] == 1
    assert "可能不止一个" in question_prompt(q)


def test_file_shapes_read_alike(toy_file):
    questions = read_questions(toy_file, "toy")
    assert [q.answer for q in questions] == ["B", "B", "C"]
    assert questions[0].options == {"A": "35℃.", "B": "37℃.", "C": "39℃.", "D": "41℃."}
    assert questions[2].options["C"] == "四个" and [q.number for q in questions] == [1, 2, 3]
    assert [round(q.chance, 2) for q in questions] == [0.25, 0.2, 0.25]


@pytest.mark.parametrize("record, message", [
    ({"question": "题", "options": "(A) 甲\n(B) 乙", "answer": "(C)"}, "field 'answer' names C, which is not an option"),
    ({"question": "题", "options": {"A": "甲", "C": "丙"}, "answer": "A"}, "lettered A, B, C"),
    ({"question": "题", "options": "(A) 甲\n乙", "answer": "A"}, "is not an option like"),
    ({"question": "", "options": ["甲", "乙"], "answer": "A"}, "field 'question'"),
    ({"question": "题", "options": ["甲", "乙"], "answer": "AA"}, "each once"),
])
def test_a_bad_record_names_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [TOY[0], record])
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: ") + ".*" + re.escape(message)):
        read_questions(path, "bad")


def test_the_command_prints_a_bad_record_as_one_line_before_loading_a_model(tmp_path, capsys):
    from medlora.cli import main

    path = write_jsonl(tmp_path / "bad.jsonl", [TOY[0], {**TOY[0], "answer": "(E)"}])
    assert main(["bench", "--benchmark", f"mine={path}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medlora bench: error: {path}, line 2: field 'answer' names E, which is not an option (A-D)"


def test_a_subset_we_do_not_commit_names_where_to_put_it(tmp_path):
    with pytest.raises(ConfigError, match="cmmlu-medical.*not committed.*--benchmark_dir"):
        resolve(["cmmlu-medical"], str(tmp_path))
    # Apollo's combined file: found, and read by each record's source
    (tmp_path / "zh.json").write_text(json.dumps([{**TOY[0], "source": "cmexam"}, {**TOY[2], "source": "x"}]))
    [subset] = load_subsets(["cmexam"], str(tmp_path))
    assert subset.total == 1 and subset.questions[0].answer == "B"


def test_cmmlu_medical_is_read_from_cmmlus_own_csvs(tmp_path):
    from medlora.benchmarks import CMMLU_MEDICAL

    folder = tmp_path / "cmmlu" / "test"
    folder.mkdir(parents=True)
    for k, subject in enumerate(CMMLU_MEDICAL):  # CMMLU's layout: an unnamed index column, then its columns
        rows = [f"{i},{subject}题{i}？,甲,乙,丙,丁,{'ABCD'[(k + i) % 4]}" for i in range(2)]
        (folder / f"{subject}.csv").write_text(",Question,A,B,C,D,Answer\n" + "\n".join(rows) + "\n", encoding="utf-8")
    [subset] = load_subsets(["cmmlu-medical"], str(tmp_path))
    assert subset.total == 14 and [q.number for q in subset.questions] == list(range(1, 15))
    first, last = subset.questions[0], subset.questions[-1]
    assert (first.question, first.options, first.answer) == ("anatomy题0？", dict(zip("ABCD", "甲乙丙丁")), "A")
    assert (last.question, last.answer) == ("virology题1？", "ABCD"[(6 + 1) % 4])
    (folder / "genetics.csv").write_text(",Question,A,B,C,D,Answer\n0,题？,甲,乙,丙,丁,E\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{folder}, genetics.csv, line 2: field 'answer' names E")):
        load_subsets(["cmmlu-medical"], str(tmp_path))


def test_few_shot_examples_are_solved_questions_of_the_subset_never_asked(generator):
    plain = load_subsets(["medqa-mcmle"], limit=5, seed=1)[0].questions
    [subset] = load_subsets(["medqa-mcmle"], limit=5, seed=1, shots=3)
    examples = subset.questions[0].examples
    assert len(examples) == 3 and all(q.examples == examples for q in subset.questions)
    assert not {q.number for q in examples} & {q.number for q in subset.questions}  # shown solved, never scored
    assert load_subsets(["medqa-mcmle"], limit=5, seed=1, shots=0)[0].questions == plain  # zero-shot: as before
    prompt = question_prompt(subset.questions[0])
    assert prompt.count(ANSWER_CUE) == 3 and prompt.endswith(question_prompt(replace(subset.questions[0], examples=())
                                                                                 ).split("\n", 1)[1])
    for example in examples:
        assert f"{example.question}\n" in prompt and f"{ANSWER_CUE} {example.answer}\n" in prompt
    rows = score_loglik(generator, subset.questions, batch_size=5)  # the longer prompts score as the short ones do
    assert [r["choice"] in r["scores"] for r in rows] == [True] * 5
    with pytest.raises(ConfigError, match="--shots 5000: medqa-mcmle has only 3426 questions"):
        load_subsets(["medqa-mcmle"], shots=5000)


def test_the_sample_is_seeded_per_subset(toy_file):
    first = load_subsets(["medqa-mcmle"], limit=5, seed=1)[0].questions
    assert len(first) == 5 and first == load_subsets(["medqa-mcmle"], limit=5, seed=1)[0].questions
    assert first != load_subsets(["medqa-mcmle"], limit=5, seed=2)[0].questions
    both = load_subsets(["medqa-mcmle", f"toy={toy_file}"], limit=5, seed=1)
    assert both[0].questions == first and both[1].total == len(both[1].questions) == 3


def test_committed_files_read_and_their_provenance_is_recorded():
    readme = (REPO_DATA / "README.md").read_text(encoding="utf-8")
    from medlora.io import file_sha256

    for name, relative in COMMITTED.items():
        questions = read_questions(REPO_DATA / relative, name)
        assert len(questions) == {"medqa-mcmle": 3426, "cmb-single": 2000}[name]
        assert file_sha256(REPO_DATA / relative) in readme, f"{relative}: its sha256 is not in the README"
    assert "cmmlu" not in " ".join(p.name for p in (REPO_DATA / "xmedbench-zh").iterdir())  # CC BY-NC-SA: not here


@pytest.mark.e2e  # trains the session's tiny adapter when no earlier test did
def test_bench_scores_base_and_adapter_side_by_side(tiny_model, tiny_adapter, toy_file, tmp_path):
    from medlora.cli import main

    out = tmp_path / "loglik"
    assert main(["bench", "--base_model", tiny_model, "--lora_weights", f"tuned={tiny_adapter}", "--benchmark",
                 f"toy={toy_file}", "--base_knowledge", "kb", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["accuracy"]) == ["base", "base+knowledge", "tuned"] and metrics["sets"]["toy"]["questions"] == 3
    plain, informed = metrics["models"]["base"], metrics["models"]["base+knowledge"]
    assert (plain["knowledge"], informed["knowledge"], informed["template"]) == ("none", "kb", "med_knowledge")
    assert metrics["sets"]["overall"]["chance"] == pytest.approx((0.25 + 0.2 + 0.25) / 3, abs=1e-4)
    assert metrics["models"]["tuned"]["adapter"] == str(tiny_adapter)
    rows = [json.loads(line) for line in (out / "tuned" / "results.jsonl").read_text().splitlines()]
    assert [r["choice"] == max(r["scores"], key=r["scores"].get) for r in rows] == [True] * 3
    assert "| toy | 3 | 0.233 |" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert page.count('class="record"') == 3 and page.count("<h3>Accuracy</h3>") == 1
    both = rows + [json.loads(line) for label in ("base", "base+knowledge")
                   for line in (out / label / "results.jsonl").read_text().splitlines()]
    right = sum(r["correct"] for r in both)  # every answer's verdict is on the page, one per model and question
    assert (page.count("· correct</span>"), page.count("· wrong</span>")) == (right, len(both) - right)



def test_generate_counts_every_unparseable_answer(generator, toy_file):
    from medlora.benchmarks import score_generate
    from medlora.config import GenerationArgs

    questions = read_questions(toy_file, "toy")
    rows = score_generate(generator, questions, GenerationArgs(max_new_tokens=4), batch_size=3)
    figures = summarise([Subset("toy", str(toy_file), 3, questions)], {"base": rows}, "generate")["accuracy"]["base"]
    assert figures["overall"]["unparseable"] == sum(r["choice"] is None for r in rows)  # a random model's noise
    assert figures["overall"]["cut_off"] == sum(r["cut_off"] for r in rows)
    assert not any(r["correct"] for r in rows if r["choice"] is None)


# --- benchmark questions stay out of every training set -----------------------------------------------------------


def _grams(normalised: str, n: int = 5) -> set[str]:
    return {normalised[i:i + n] for i in range(max(len(normalised) - n + 1, 1))}


def _training_texts() -> list[str]:
    """Every question the project trains on: data/medqa train and valid (what `medlora data build` writes) and every
    user turn of data/medchat's training conversations."""
    from medlora.data import load_records

    texts = [r["instruction"] + r["input"] for split in ("train", "valid")
             for r in load_records(REPO / "data" / "medqa" / f"{split}.jsonl")]
    for r in load_records(REPO / "data" / "medchat" / "train.jsonl"):
        texts += [r["instruction"] + r["input"], *(user for user, _ in r.get("history", []))]
    return texts


def _copies(questions: list[Question], trained: list[str]) -> list[str]:
    """The questions found in `trained`: a question with its options at character 5-gram Jaccard ≥ 0.6 to a training
    text (as the exam's check, tests/test_exam.py; an inverted index finds the candidates sharing a 5-gram), or a
    question stem of 16 or more characters inside one."""
    from medlora.vocab import normalise

    normalised = [normalise(text) for text in trained]
    grams = [_grams(text) for text in normalised]
    by_gram = defaultdict(set)
    for i, gs in enumerate(grams):
        for g in gs:
            by_gram[g].add(i)
    joined, found = "\n".join(normalised), []
    for q in questions:
        stem = normalise(q.question)
        if len(stem) >= 16 and stem in joined:
            found.append(f"{q.subset} question {q.number} is in the training data")
        mine = _grams(stem + normalise("".join(q.options.values())))
        for i in set().union(*(by_gram.get(g, set()) for g in mine)):
            jaccard = len(mine & grams[i]) / len(mine | grams[i])
            if jaccard >= 0.6:
                found.append(f"{q.subset} question {q.number} is a near-copy ({jaccard:.2f}) of: {trained[i]}")
    return found


def test_no_committed_benchmark_question_or_near_copy_is_in_the_training_data():
    questions = [q for name, relative in COMMITTED.items() for q in read_questions(REPO_DATA / relative, name)]
    assert not _copies(questions, _training_texts())[:3]


def test_the_copy_check_sees_a_copy_and_a_near_copy():
    q = read_questions(REPO_DATA / COMMITTED["medqa-mcmle"], "medqa-mcmle")[0]
    options = "\n".join(f"{letter}、{text}" for letter, text in q.options.items())
    assert _copies([q], ["感冒怎么办？", f"{q.question}（ ）\n{options}"])  # our data's multiple-choice layout
    assert _copies([q], [f"病例讨论：{q.question}？请解释。"])  # the stem alone, inside a longer text
    assert not _copies([q], ["医院感染流行时应如何处理？"])
