"""report.md / report.html / loss_curve.png from small hand-made results (no model needed)."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from medlora.errors import ConfigError
from medlora.eval.metrics import score_results
from medlora.eval.report import compare_records, write_report

VOID = {"meta", "img", "input", "br", "hr", "link"}

ROWS = {
    "base": [
        {"instruction": "感冒的常见症状是什么？", "input": "", "golden": "鼻塞、流涕、咽痛。", "output": "发热。",
         "tokens": 3, "seconds": 0.1, "ended_by_eos": True},
        {"instruction": "<script>alert('x')</script> & “引号” 用什么药？", "input": "患者 <b>成人</b>",
         "golden": "沙丁胺醇吸入。", "output": "沙丁胺醇 | 吸入 *", "tokens": 5, "seconds": 0.2, "ended_by_eos": False},
    ],
    "tuned": [
        {"instruction": "感冒的常见症状是什么？", "input": "", "golden": "鼻塞、流涕、咽痛。", "output": "鼻塞、流涕、咽痛。",
         "tokens": 6, "seconds": 0.1, "ended_by_eos": True},
        {"instruction": "<script>alert('x')</script> & “引号” 用什么药？", "input": "患者 <b>成人</b>",
         "golden": "沙丁胺醇吸入。", "output": "沙丁胺醇吸入。", "tokens": 5, "seconds": 0.1, "ended_by_eos": True},
    ],
}


class StrictParser(HTMLParser):
    """Collects text, tags and script bodies; records any element closed out of order."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.text, self.tags, self.scripts = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}>")

    def handle_data(self, data):
        (self.scripts if self.stack and self.stack[-1] == "script" else self.text).append(data)


@pytest.fixture
def report_dir(tmp_path):
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    log = [{"step": s, "epoch": s / 10, "loss": 3.0 / s} for s in range(1, 21)]
    log += [{"step": s, "epoch": s / 10, "eval_loss": 2.5 / s ** 0.5} for s in (5, 10, 15, 20)]
    (train_dir / "loss_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log), encoding="utf-8")
    metrics = {label: score_results(rows) for label, rows in ROWS.items()}
    write_report(tmp_path / "out", metrics, ROWS, train_dir=train_dir, subtitle="records: test")
    return tmp_path / "out"


def test_html_parses_and_escapes_every_record(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert not parser.errors and parser.stack == []
    text = "".join(parser.text)
    for rows in ROWS.values():
        for row in rows:
            assert row["instruction"] in text and row["output"] in text and row["golden"] in text
    assert "<script>alert" not in page and "<b>成人" not in page          # escaped, not live markup
    tags = [tag for tag, _ in parser.tags]
    assert "table" in tags and "script" in tags and "http" not in "".join(parser.scripts)
    assert {a.get("id") for _, a in parser.tags} >= {"filter", "sort", "records"}
    sections = [a for tag, a in parser.tags if tag == "section"]
    assert len(sections) == 2 and sections[0]["data-s1"] == "1.0000"     # per-model ROUGE-L for sorting
    images = [a["src"] for tag, a in parser.tags if tag == "img"]
    assert images and images[0].startswith("data:image/png;base64,")     # self-contained
    assert not any(a.get("src", "").startswith("http") or a.get("href", "").startswith("http") for _, a in parser.tags)


def test_best_value_marked(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert '<td class="best" title="best">1.000 ★</td>' in page
    markdown = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "| tuned | 2 | **1.000** ★" in markdown
    assert "![training and validation loss](loss_curve.png)" in markdown
    assert "沙丁胺醇 \\| 吸入 \\*" in markdown and "&lt;script&gt;" in markdown


def test_loss_curve_png_size(report_dir):
    from PIL import Image

    with Image.open(report_dir / "loss_curve.png") as image:
        assert image.format == "PNG" and image.size == (800, 450)


def test_compare_records_matches_by_instruction():
    shuffled = {"base": ROWS["base"], "tuned": list(reversed(ROWS["tuned"]))}
    records = compare_records(shuffled)
    assert len(records) == 2 and records[0].rouge_l == {"base": 0.0, "tuned": 1.0}


def test_missing_loss_log_is_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match="loss_log.jsonl"):
        write_report(tmp_path, {"m": score_results(ROWS["base"])}, {"m": ROWS["base"]}, train_dir=tmp_path)
