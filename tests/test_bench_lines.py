"""bench/run.py's summary lines and bench/report.py's GPU rows, on made-up figures (no model, no training)."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402
import run  # noqa: E402


def _train(seconds: float, **extra) -> dict:
    return {"seconds": seconds, "supervised_tokens": 1000, "peak_rss_mb": 2000.0, "peak_gpu_mb": 900.0,
            "flops": {"model_flops": 4e12}, "train_loss": 2.5, **extra}


def _results(with_trl: bool) -> dict:
    train = {"ours": [_train(10)], "ref": [_train(40, peak_gpu_mb=1800.0)]}
    val = {"ours": {"val_loss": 2.58}, "ref": {"val_loss": 2.59}}
    if with_trl:
        train["trl"] = [_train(50, trl="1.16.0")]
        val["trl"] = {"val_loss": 2.60}
    return {"train": train, "val": val, "peak": {"gflops": 400.0, "device": "cuda"},
            "infer": {"ours": [], "ref": [], "ours-beam": []}, "latency": [],
            "val_speed": [{"n": 64, "medlora_s": 5.0, "trainer_s": 15.0, "medlora_loss": 2.6, "trainer_loss": 2.61}],
            "answers": {"base": [], "tuned": [], "adapter": None}, "measured": {"train": "2026-12-01 18:00"},
            "settings": {"n_train": 512, "runs": 1}, "machine": {"torch": "2.11.0+cu130"}}


def test_every_line_is_printed_and_the_missing_ones_say_why(monkeypatch):
    monkeypatch.setattr(run, "trl_installed", lambda: False)
    lines = {line["name"]: line for line in run.summary_lines(_results(with_trl=False))}
    assert lines["train_throughput"]["ratio"] == 4.0
    assert lines["val_loss_speedup"]["ratio"] == 3.0
    assert "pip install -e '.[bench-trl]' torch==2.13.0" in lines["train_vs_trl"]["skipped"]
    assert "skipped" in lines["infer_batch_throughput"] and "skipped" in lines["tuned_vs_base_tokens_per_s"]
    assert "skipped" in lines["continuous_vs_static"]


def test_answer_lines_compare_tuned_with_base_and_continuous_with_static_batches():
    results = _results(with_trl=False)
    answer = {"answers": 32, "tokens": 1000, "ended_by_eos": 30}
    results["answers"] = {"base": [{**answer, "seconds": 50.0}], "tuned": [{**answer, "seconds": 40.0}],
                          "tuned-static": [{**answer, "seconds": 60.0}], "adapter": "runs/demo/adapter"}
    lines = {line["name"]: line for line in run.summary_lines(results)}
    assert lines["tuned_vs_base_tokens_per_s"]["ratio"] == 1.25
    line = lines["continuous_vs_static"]
    assert line["ratio"] == 1.5 and "continuous vs static" in line["unit"]


def test_train_vs_trl_reports_the_ratio_and_both_losses():
    line = next(line for line in run.summary_lines(_results(with_trl=True)) if line["name"] == "train_vs_trl")
    assert line["ratio"] == 5.0
    assert line["val_loss"] == {"ours": 2.58, "trl": 2.60} and line["train_loss"] == {"ours": 2.5, "trl": 2.5}
    assert "TRL 1.16.0" in line["unit"]


def test_train_compiled_compares_the_compiled_run_with_ours_in_the_same_run():
    results = _results(with_trl=False)
    results["train"]["compiled"] = [_train(8)]
    results["val"]["compiled"] = {"val_loss": 2.57}
    lines = {line["name"]: line for line in run.summary_lines(results)}
    assert lines["train_compiled"]["ratio"] == 1.25
    assert lines["train_compiled"]["val_loss"] == {"compiled": 2.57, "ours": 2.58}
    assert "skipped" in next(line for line in run.summary_lines(_results(with_trl=False))
                             if line["name"] == "train_compiled")
    assert "**1.25×**" in "\n".join(report._peer_lines(lines))


def test_gpu_rows_compare_ours_with_the_reference():
    results = _results(with_trl=False)
    results["gpu"] = {"name": "NVIDIA H200, 143771 MiB", "weights": "random"}
    text = "\n".join(report.gpu_rows(results))
    assert "NVIDIA H200" in text and "random weights" in text
    assert "| training, supervised tokens/s | 100 / 100 / 100 | 25 / 25 / 25 | 4.00× |" in text
    assert "| training, peak GPU memory (MB, torch allocated) |" in text and "0.50×" in text
    assert "ours 2.5800, reference 2.5900" in text


def test_the_pages_hand_written_part_is_kept_and_the_rest_is_rewritten(tmp_path):
    page = tmp_path / "benchmarks.md"
    assert report._hand_written(page) == []  # no page yet
    page.write_text("# Benchmarks\n\nold table\n", encoding="utf-8")
    assert report._hand_written(page) == []  # no hand-written part
    page.write_text(f"# Benchmarks\n\nold table\n\n{report.HAND_WRITTEN}\n\n## Round six\n\nby hand\n", encoding="utf-8")
    assert report._hand_written(page) == ["", "## Round six\n\nby hand"]
