"""Metrics against values worked out by hand, option-letter extraction, and `medlora eval` end to end."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_RECORDS, run_medlora
from medlora.eval.mcq import extract_choice, golden_choice
from medlora.eval.metrics import bleu4, exact_match, per_record_rouge_l, rouge_scores, score_results
from medlora.vocab import char_tokens, normalise, parse_options

# --- character tokens, ROUGE, BLEU, exact match ---------------------------------------------------------------


def test_char_tokens_split_characters_and_drop_space_and_punctuation():
    assert char_tokens("肝硬化，腹水。") == ["肝", "硬", "化", "腹", "水"]
    assert char_tokens(" CT 检查! ") == ["c", "t", "检", "查"]
    assert char_tokens("（全角）ＡＢ") == ["全", "角", "a", "b"]


def test_rouge_identical_and_disjoint():
    assert rouge_scores("结核分枝杆菌。", "结核分枝杆菌。") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_scores("心内科", "硫酸亚铁") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_partial_overlap_by_hand():
    # pred 肝硬化 (3 chars, bigrams 肝硬 硬化) vs ref 肝硬化腹水 (5 chars, bigrams 肝硬 硬化 化腹 腹水)
    scores = rouge_scores("肝硬化", "肝硬化腹水")
    assert scores["rouge1"] == pytest.approx(0.75)      # P=3/3, R=3/5 → 2·1·0.6/1.6
    assert scores["rouge2"] == pytest.approx(2 / 3)     # P=2/2, R=2/4 → 2·1·0.5/1.5
    assert scores["rougeL"] == pytest.approx(0.75)      # LCS 肝硬化 = 3


def test_rouge_l_uses_subsequence_not_substring():
    # pred 咽痛鼻塞 vs ref 鼻塞流涕咽痛: unigram overlap 4 → R1 = 2·(4/4)(4/6)/(4/4+4/6) = 0.8;
    # LCS is 2 (鼻塞 or 咽痛) → P=2/4, R=2/6 → F = 2·0.5·(1/3)/(0.5+1/3) = 0.4; bigrams 咽痛, 鼻塞 match → 2/3, 2/5 → 0.5
    scores = rouge_scores("咽痛，鼻塞", "鼻塞、流涕、咽痛")
    assert scores["rouge1"] == pytest.approx(0.8)
    assert scores["rougeL"] == pytest.approx(0.4)
    assert scores["rouge2"] == pytest.approx(0.5)


def test_exact_match_ignores_whitespace_punctuation_and_width():
    assert normalise(" 心内科。 ") == "心内科"
    assert exact_match("心 内 科！", "心内科。")
    assert exact_match("ＣＴ检查", "ct检查")
    assert not exact_match("心外科", "心内科")


def test_bleu_identical_and_disjoint():
    refs = ["小王可能患有肝硬化和肝癌，建议进一步检查。", "糖尿病的典型症状是多饮、多尿、多食和体重下降。"]
    assert bleu4(refs, refs) >= 0.99
    assert bleu4(["心内科门诊"] * 2, refs) == 0.0


# --- multiple choice ---------------------------------------------------------------------------------------

QUESTION = "肝炎双重感染最可能的并发症是？\nA. 肝癌\nB. 胆囊炎\nC. 肝硬化\nD. 胰腺炎\nE. 肾炎"


@pytest.mark.parametrize("answer, letter", [
    ("答案: A", "A"),
    ("答案：B\n解析：……", "B"),
    ("A. 肝硬化", "A"),
    ("选B", "B"),
    ("正确答案是C。", "C"),
    ("(D)", "D"),
    ("根据以上分析，故选E", "E"),
    ("the answer is A", "A"),
    ("Answer: (B)", "B"),
    ("B项", "B"),
    ("我认为是 C", "C"),
    ("正确选项为 D", "D"),
    ("（C）肝硬化", "C"),
    ("应选 D。", "D"),
    ("答案应为E", "E"),
    ("解析: 最常见的是肝硬化。逐项对照：A. 肝癌：否；B. 胆囊炎：否；C. 肝硬化：是。\n答案: C", "C"),  # an earlier form
    ("答案: C。肝硬化是乙肝最常见的后果之一，故选此项。", "C"),  # the built-in form: the letter, then the fact
    ("答案: C。肝硬化", "C"),  # cut off after the letter
    ("解析: 乙肝最常见的后果之一是肝硬化。肝硬化是选项C。\n答案: C", "C"),  # an earlier form
    ("解析: 乙肝最常见的后果之一是肝硬化。肝硬化是选项C。", "C"),  # cut off before 答案
    ("解析: 选项: 肝癌(A)、胆囊炎(B)、肝硬化(C)。乙肝最常见的后果之一是肝硬化。肝硬化是选项C。\n答案: C", "C"),  # restated
    ("解析: 选项: 肝癌(A)、胆囊炎(B)、肝硬化(C)。乙肝最常见的后果之一是肝硬化。", "C"),  # cut off: the fact names C
    ("解析: 选项: 肝癌(A)、胆囊炎(B)、肝硬化(C)。乙肝最常见的后果", None),  # cut off after the list: no choice
    ("解析: 选项: 肝癌(A)、胆囊炎(B)、肝", None),  # cut off inside the list
    ("解析: 逐项对照：A. 肝癌：否；B. 胆囊炎：否；C. 肝硬化：是", None),  # cut off before the letter: 3 options named
    ("ｃ", None),                 # lower case is not an option letter
    ("肝硬化", "C"),               # names only the option text
    ("最可能是肝硬化。", "C"),
    ("维生素B12缺乏", None),       # a letter inside a word is not a choice
    ("病原体是EB病毒", None),
    ("the answer is a bit unclear", None),
])
def test_extract_choice(answer, letter):
    assert extract_choice(answer, QUESTION) == letter


def test_extract_choice_from_golden_option_text():
    assert extract_choice("肝硬化", options={"C": "肝硬化"}) == "C"
    assert extract_choice("肝硬化腹水", "选项 A.肝硬化 B.肝硬化腹水 C.肝癌") == "B"  # the longer option wins
    assert extract_choice("肝癌或肝硬化", QUESTION) is None                           # two options named


def test_parse_options_on_lines_and_inline():
    assert parse_options(QUESTION)["C"] == "肝硬化"
    assert parse_options("哪项正确 A.肝炎 B.肝硬化 C.肝癌") == {"A": "肝炎", "B": "肝硬化", "C": "肝癌"}
    assert parse_options("维生素A缺乏的表现？") == {}


@pytest.mark.parametrize("golden, instruction, letter", [
    ("C", "", "C"),
    ("(B)", "", "B"),
    ("答案: C\n解析: 肝硬化最常见", "", "C"),
    ("答案：D", "", "D"),
    ("解析: 双重感染易致肝硬化，少数发展为肝癌。\n答案: C", QUESTION, "C"),  # reason first, two options named
    ("解析: 最常见的是肝硬化。逐项对照：A. 肝癌：否；B. 胆囊炎：否；C. 肝硬化：是。\n答案: C", QUESTION, "C"),
    ("解析: 双重感染易致肝癌。肝硬化是选项C。\n答案: C", QUESTION, "C"),  # the built-in form
    ("C. 肝硬化", "", "C"),
    ("肝硬化是最常见的并发症", QUESTION, "C"),
    ("肝硬化是最常见的并发症", "", None),
    ("E. coli 感染", "", None),
    ("心内科。", "", None),
])
def test_golden_choice(golden, instruction, letter):
    assert golden_choice(golden, instruction) == letter


def test_score_results_mcq_and_rates():
    rows = [
        {"instruction": QUESTION, "golden": "答案: C\n解析: …", "output": "正确答案是C", "tokens": 4, "seconds": 1.0,
         "ended_by_eos": True},
        {"instruction": "并发症？", "golden": "C. 肝硬化", "output": "肝硬化", "tokens": 2, "seconds": 0.5,
         "ended_by_eos": True},
        {"instruction": QUESTION, "golden": "A", "output": "故选B", "tokens": 2, "seconds": 0.5, "ended_by_eos": False},
        {"instruction": "高血压应该去哪个科室？", "golden": "心内科。", "output": "心内科", "tokens": 2, "seconds": 0.0,
         "ended_by_eos": True},
    ]
    metrics = score_results(rows)
    assert metrics["mcq_n"] == 3 and metrics["mcq_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert metrics["n"] == 4 and metrics["exact_match"] == 0.25  # only 心内科 matches its golden exactly
    assert metrics["eos_rate"] == 0.75
    assert metrics["tokens_per_s"] == 5.0                          # 10 tokens / 2 s
    assert metrics["avg_answer_chars"] == pytest.approx((6 + 3 + 3 + 3) / 4)
    assert per_record_rouge_l(rows)[3] == 1.0


def test_score_results_without_mcq_gives_null_accuracy():
    metrics = score_results([{"instruction": "q", "golden": "心内科。", "output": "心内科。"}])
    assert metrics["mcq_n"] == 0 and metrics["mcq_accuracy"] is None
    assert metrics["rougeL"] == 1.0 and metrics["eos_rate"] is None and metrics["tokens_per_s"] is None


# --- end to end ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tiny_model, tiny_adapter, tmp_path_factory):
    # the records labelled as the exam's are (kind, disease, attribute): the labels reach results.jsonl
    labelled = tmp_path_factory.mktemp("eval-data") / "labelled.jsonl"
    labels = [{"kind": "free", "disease": "支气管哮喘" if "哮喘" in r["instruction"] else "",
               "attribute": "drugs" if "哮喘" in r["instruction"] else ""} for r in TINY_RECORDS]
    labelled.write_text("".join(json.dumps({**r, **extra}, ensure_ascii=False) + "\n"
                                for r, extra in zip(TINY_RECORDS, labels)), encoding="utf-8")
    out = tmp_path_factory.mktemp("eval") / "ev"
    proc = run_medlora("eval", "--base_model", tiny_model, "--lora_weights", str(tiny_adapter), "--data",
                       str(labelled), "--out", str(out), "--dtype", "fp32", "--max_new_tokens", "24",
                       "--perplexity", "--show", "1")
    return out, proc


def test_eval_writes_metrics_and_reports(evaluated, tiny_adapter):
    out, proc = evaluated
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    tuned = tiny_adapter.name
    assert list(metrics) == ["base", tuned]
    assert metrics[tuned]["rougeL"] == 1.0 and metrics[tuned]["exact_match"] == 1.0
    assert metrics[tuned]["rougeL"] > metrics["base"]["rougeL"]
    assert metrics[tuned]["perplexity"] < metrics["base"]["perplexity"]
    assert metrics[tuned]["n"] == len(TINY_RECORDS)
    # the fact-level scores: the tuned model answers 沙丁胺醇吸入 to the asthma record (1 of the KB's 5 drugs)
    assert metrics[tuned]["fact_n"] == 1 and metrics[tuned]["fact_recall"] == 0.2
    assert metrics[tuned]["fact_precision"] == 1.0 and metrics[tuned]["leak_rate"] == 0.0
    assert list(metrics[tuned]["by_kind"]) == ["free"] and metrics[tuned]["by_kind"]["free"]["rougeL"] == 1.0
    rows = [json.loads(line) for line in (out / tuned / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["kind"] for row in rows] == ["free"] * len(TINY_RECORDS)
    assert "Fact-level scores" in (out / "report.md").read_text(encoding="utf-8")
    for name in ("report.html", "report.md", "base/results.jsonl", f"{tuned}/results.jsonl"):
        assert (out / name).is_file(), name
    assert "###model output###" in proc.stdout and "ROUGE-L" in proc.stdout
    # the report says how the answers were generated
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "max_new_tokens 24" in html and "repetition_penalty 1.0" in html
    assert r"max\_new\_tokens 24" in (out / "report.md").read_text(encoding="utf-8")  # markdown-escaped


def test_eval_rescores_results_files_identically(evaluated, tiny_adapter, tmp_path):
    out, _ = evaluated
    tuned = tiny_adapter.name
    run_medlora("eval", "--results", str(out / "base" / "results.jsonl"), f"tuned={out / tuned / 'results.jsonl'}",
                "--out", str(tmp_path), "--show", "0")
    first = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    again = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for old, new in (("base", "base"), (tuned, "tuned")):
        generated = {k: v for k, v in first[old].items() if k not in ("eval_loss", "perplexity")}
        assert again[new] == generated


def test_evaluate_from_python_answers_scores_and_writes_what_the_command_writes(tiny_model, tmp_path):
    from medlora.config import GenerationArgs
    from medlora.eval import EvalSettings, evaluate

    records = [{**r, "kind": "free"} for r in TINY_RECORDS[:2]]
    settings = EvalSettings(prompt_template="chat", perplexity=True, answer_cache=False)  # chat: no stop strings
    done = evaluate(tiny_model, records, settings=settings, generation=GenerationArgs(max_new_tokens=4),
                    out=tmp_path / "ev")
    assert list(done.rows) == ["base"]
    assert [row["golden"] for row in done.rows["base"]] == [r["output"] for r in records]
    assert done.metrics["base"]["n"] == 2 and done.metrics["base"]["perplexity"] > 1
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text(encoding="utf-8")) == done.metrics
    assert [p.name for p in done.files] == ["metrics.json", "report.md", "report.html"]
    assert (tmp_path / "ev" / "base" / "results.jsonl").is_file()
    again = evaluate(None, [], results={"again": done.rows["base"]})  # answers given: scored, no model loaded
    perplexity = ("eval_loss", "perplexity")
    assert again.metrics["again"] == {k: v for k, v in done.metrics["base"].items() if k not in perplexity}
    assert again.files == []


def test_eval_refuses_duplicate_labels(tmp_path):
    proc = run_medlora("eval", "--results", "a/results.jsonl", "b/base/results.jsonl", "--base_model", "tiny-qwen2",
                       "--data", "x.jsonl", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "labelled base" in proc.stderr


@pytest.mark.parametrize("row, message", [
    ({"instruction": "问", "output": "答"}, "field 'golden' is missing"),
    ({"instruction": "问", "golden": None, "output": "答"}, "field 'golden' must be a string, got NoneType"),
    ([1, 2], "a result must be a JSON object"),
])
def test_results_without_golden_answers_are_refused_naming_the_field(tmp_path, capsys, row, message):
    path = tmp_path / "m" / "results.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"instruction": "问", "golden": "答", "output": "答"}) + "\n" + json.dumps(row) + "\n",
                    encoding="utf-8")
    from medlora.cli import main

    assert main(["eval", "--results", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"medlora eval: error: {path}, line 2: {message}")
    assert not (tmp_path / "out").exists()


def test_the_base_models_answers_are_reused_by_a_run_that_asks_the_same(tiny_model, tiny_records_file, tmp_path,
                                                                         caplog, monkeypatch):
    from medlora.cli import main

    args = ["eval", "--base_model", tiny_model, "--data", str(tiny_records_file), "--max_new_tokens", "3",
            "--dtype", "fp32", "--show", "0", "--batch_size", "3"]
    reused = "base's answers are those of an earlier run with the same model, data and settings"
    import medlora.eval.runner as runner

    digest = runner.source_digest() + str(tmp_path)  # a key no earlier session used: MEDLORA_TEST_HOME may be kept
    monkeypatch.setattr(runner, "source_digest", lambda: digest)
    with caplog.at_level("INFO", logger="medlora"):
        for run, extra in (("a", []), ("b", []), ("c", ["--answer_cache", "false"]), ("d", [])):  # c: asked not to
            caplog.clear()
            if run == "d":  # medlora's code changed (retrieval or prompts may differ): answered again
                monkeypatch.setattr(runner, "source_digest", lambda: digest[::-1])
            assert main([*args, *extra, "--out", str(tmp_path / run)]) == 0
            assert (reused in caplog.text) is (run == "b"), (run, caplog.text)
    results = [(tmp_path / run / "base" / "results.jsonl").read_text() for run in ("a", "b", "c")]
    assert results[0] == results[1]  # the very rows, timings included
    assert [json.loads(line)["output"] for line in results[2].splitlines()] == \
        [json.loads(line)["output"] for line in results[0].splitlines()]  # generated again: the same answers
