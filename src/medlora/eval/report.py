"""Evaluation reports people can read: `report.md` and a self-contained `report.html`, plus `loss_curve.png`.

Both show the metrics table (best value per column marked) and every record with its golden answer and each
model's answer side by side, with that answer's ROUGE-L. The HTML page needs no network: CSS, JS and the
loss-curve image are inline; all text is escaped.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from medlora.errors import ConfigError
from medlora.eval.metrics import per_record_rouge_l
from medlora.eval.tables import table_cells
from medlora.io import atomic_path, atomic_write_text

LOSS_LOG = "loss_log.jsonl"  # written by medlora.train into the training output folder
LOSS_CURVE = "loss_curve.png"
CURVE_INCHES, CURVE_DPI = (8, 4.5), 100  # → 800x450 px


@dataclass
class ComparedRecord:
    """One record with every model's answer and that answer's ROUGE-L (None: no golden answer to compare)."""

    instruction: str
    input: str
    golden: str
    answers: dict[str, str] = field(default_factory=dict)
    rouge_l: dict[str, float | None] = field(default_factory=dict)


def compare_records(rows_by_label: dict[str, list[dict]]) -> list[ComparedRecord]:
    """Records matched across models by (instruction, input, occurrence), in the order first seen."""
    records: dict[tuple, ComparedRecord] = {}
    for label, rows in rows_by_label.items():
        seen: dict[tuple, int] = {}
        for row, score in zip(rows, per_record_rouge_l(rows)):
            base_key = (row.get("instruction") or "", row.get("input") or "")
            seen[base_key] = seen.get(base_key, 0) + 1
            record = records.setdefault((*base_key, seen[base_key]), ComparedRecord(*base_key, row.get("golden") or ""))
            record.golden = record.golden or row.get("golden") or ""
            record.answers[label] = row.get("output") or ""
            record.rouge_l[label] = score
    return list(records.values())


# --- loss curve ----------------------------------------------------------------------------------------------

def read_loss_log(train_dir: str | Path) -> list[dict]:
    path = Path(train_dir) / LOSS_LOG
    if not path.is_file():
        raise ConfigError(f"--train_dir {train_dir}: no {LOSS_LOG} there (medlora finetune writes it in --output_dir)")
    from medlora.data import read_rows

    return [row for _, row in read_rows(path)]


def plot_loss_curve(log_rows: list[dict], png_path: str | Path) -> Path:
    """Training and validation loss against the optimizer step, as an 800x450 PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def points(key):
        return [(r["step"], r[key]) for r in log_rows if isinstance(r.get(key), (int, float)) and "step" in r]

    train, val = points("loss"), points("eval_loss")
    if not train and not val:
        raise ConfigError(f"{LOSS_LOG}: no 'loss' or 'eval_loss' entries to plot")
    figure = Figure(figsize=CURVE_INCHES, dpi=CURVE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="training loss", color="#1f77b4")
    if val:
        axes.plot(*zip(*val), "o-", label="validation loss", color="#d62728")
    title = "Training and validation loss" if train and val else "Training loss" if train else "Validation loss"
    axes.set(xlabel="step", ylabel="loss", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(png_path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=CURVE_DPI)
    return Path(png_path)


# --- markdown ------------------------------------------------------------------------------------------------

def _md(text: str) -> str:
    """Text safe inside a Markdown paragraph or table cell."""
    text = html.escape(text or "", quote=False)
    for char in "\\`*_[]|#":
        text = text.replace(char, "\\" + char)
    return text.replace("\r", "").replace("\n", "<br>")


def _score(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_metrics(metrics_by_label: dict[str, dict]) -> list[str]:
    """Every table of `medlora.eval.tables.sections`, headline first, each under its own heading."""
    lines = []
    for title, columns, rows in table_cells(metrics_by_label):
        lines += [f"### {title}", "", "| model | " + " | ".join(m.header for m in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        lines += [f"| {_md(label)} | " + " | ".join(f"**{text}** ★" if best else text for text, best in cells) + " |"
                  for label, cells in rows]
        lines.append("")
    return lines


def render_markdown(metrics_by_label: dict[str, dict], records: list[ComparedRecord], loss_curve: str | None = None,
                    subtitle: str = "") -> str:
    lines = ["# medlora evaluation", ""]
    if subtitle:
        lines += [_md(subtitle), ""]
    lines += ["## Metrics", "", *markdown_metrics(metrics_by_label),
              "★ marks the best value of each column. Fact-level scores, leaks and safety: docs/evaluation.md. "
              "ROUGE and BLEU are computed on characters.", ""]
    if loss_curve:
        lines += ["## Loss curves", "", f"[![training and validation loss]({loss_curve})]({loss_curve})", ""]
    lines += ["## Records", ""]
    for number, record in enumerate(records, 1):
        lines += [f"### {number}", "", f"**Instruction:** {_md(record.instruction)}", ""]
        if record.input:
            lines += [f"**Input:** {_md(record.input)}", ""]
        lines += [f"**Golden:** {_md(record.golden)}", "", "| model | ROUGE-L | answer |", "|---|---:|---|"]
        lines += [f"| {_md(label)} | {_score(record.rouge_l.get(label))} | {_md(answer)} |"
                  for label, answer in record.answers.items()]
        lines.append("")
    return "\n".join(lines)


# --- html ----------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,"PingFang SC","Noto Sans CJK SC","Microsoft YaHei",sans-serif;margin:2em auto;
 max-width:1200px;padding:0 1em;color:#222;line-height:1.5}
h1{margin-bottom:.2em} .subtitle{color:#666;margin-top:0}
table.metrics{border-collapse:collapse;margin:1em 0} table.metrics th,table.metrics td{padding:.3em .7em;
 border-bottom:1px solid #ddd;text-align:right;font-variant-numeric:tabular-nums} table.metrics th:first-child,
 table.metrics td:first-child{text-align:left} table.metrics th,table.metrics td{white-space:nowrap}
td.best{font-weight:bold;color:#0a7a2f}
.controls{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd;display:flex;gap:1em;
 align-items:center} .controls input{flex:1;padding:.4em;font-size:1em} .controls select{padding:.4em}
.record{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em 1em} .record h3{margin:.2em 0;color:#666;
 font-size:.9em} .field{margin:.3em 0} .label{font-weight:bold;margin-right:.4em} .text{white-space:pre-wrap}
.golden{background:#f4f8f4;padding:.3em .5em;border-radius:4px}
.answers{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:.6em;margin-top:.5em}
.answer{background:#f7f7fb;border-radius:4px;padding:.4em .6em}
.answer .head{display:flex;justify-content:space-between;font-weight:bold;margin-bottom:.2em}
.score{font-variant-numeric:tabular-nums;color:#555}
.score.good{color:#0a7a2f} .score.bad{color:#b3261e} img.curve{max-width:100%;border:1px solid #eee}
"""

_JS = """
(function () {
  var box = document.getElementById("filter"), sort = document.getElementById("sort");
  var list = document.getElementById("records"), count = document.getElementById("count");
  var records = Array.prototype.slice.call(list.querySelectorAll(".record"));
  function score(record, model) {
    var value = parseFloat(record.getAttribute("data-s" + model));
    return isNaN(value) ? null : value;
  }
  function apply() {
    var query = box.value.trim().toLowerCase(), shown = 0;
    records.forEach(function (record) {
      var hit = !query || record.textContent.toLowerCase().indexOf(query) >= 0;
      record.hidden = !hit;
      if (hit) shown += 1;
    });
    var order = records.slice(), choice = sort.value.split(":");
    order.sort(function (a, b) {
      if (!sort.value) return a.getAttribute("data-order") - b.getAttribute("data-order");
      var x = score(a, choice[0]), y = score(b, choice[0]);
      if (x === null || y === null) return (x === null) - (y === null);  // records without a score go last
      return choice[1] === "asc" ? x - y : y - x;
    });
    order.forEach(function (record) { list.appendChild(record); });
    count.textContent = shown + " / " + records.length + " records";
  }
  box.addEventListener("input", apply);
  sort.addEventListener("change", apply);
  apply();
})();
"""


def _h(text) -> str:
    return html.escape(str(text if text is not None else ""), quote=True)


def html_metrics(metrics_by_label: dict[str, dict]) -> str:
    """Every table of `medlora.eval.tables.sections`, headline first, each under its own heading."""
    tables = []
    for title, columns, rows in table_cells(metrics_by_label):
        head = "".join(f"<th>{_h(m.header)}</th>" for m in columns)
        body = "".join(f"<tr><td>{_h(label)}</td>" + "".join(
            f'<td class="best" title="best">{_h(text)} ★</td>' if best else f"<td>{_h(text)}</td>"
            for text, best in cells) + "</tr>" for label, cells in rows)
        tables.append(f'<h3>{_h(title)}</h3><table class="metrics"><thead><tr><th>model</th>{head}</tr></thead>'
                      f"<tbody>{body}</tbody></table>")
    return "".join(tables)


def _html_field(name: str, text: str, extra_class: str = "") -> str:
    return (f'<div class="field {extra_class}"><span class="label">{name}</span>'
            f'<span class="text">{_h(text)}</span></div>')


def _html_record(number: int, record: ComparedRecord, labels: list[str]) -> str:
    scores = "".join(f' data-s{i}="{record.rouge_l[label]:.4f}"' for i, label in enumerate(labels)
                     if record.rouge_l.get(label) is not None)
    parts = [f'<section class="record" data-order="{number}"{scores}><h3>#{number}</h3>',
             _html_field("Instruction", record.instruction)]
    if record.input:
        parts.append(_html_field("Input", record.input))
    parts += [_html_field("Golden", record.golden, "golden"), '<div class="answers">']
    for label in labels:
        if label not in record.answers:
            continue
        value = record.rouge_l.get(label)
        grade = "" if value is None else " good" if value >= 0.5 else " bad" if value < 0.2 else ""
        parts.append(f'<div class="answer"><div class="head"><span>{_h(label)}</span>'
                     f'<span class="score{grade}">ROUGE-L {_score(value)}</span></div>'
                     f'<div class="text">{_h(record.answers[label])}</div></div>')
    parts.append("</div></section>")
    return "".join(parts)


def render_html(metrics_by_label: dict[str, dict], records: list[ComparedRecord], loss_curve_png: bytes | None = None,
                subtitle: str = "") -> str:
    labels = list(metrics_by_label)
    directions = (("desc", "high → low"), ("asc", "low → high"))
    options = "".join(f'<option value="{i}:{direction}">ROUGE-L of {_h(label)}, {arrow}</option>'
                      for i, label in enumerate(labels) for direction, arrow in directions)
    curve = ""
    if loss_curve_png:
        data = base64.b64encode(loss_curve_png).decode("ascii")
        curve = (f'<h2>Loss curves</h2><img class="curve" alt="training and validation loss" '
                 f'src="data:image/png;base64,{data}">')
    body = "".join(_html_record(number, record, labels) for number, record in enumerate(records, 1))
    return f"""<!DOCTYPE html>
<html lang="zh">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>medlora evaluation</title><style>{_CSS}</style></head>
<body>
<h1>medlora evaluation</h1>
<p class="subtitle">{_h(subtitle)}</p>
<h2>Metrics</h2>
{html_metrics(metrics_by_label)}
<p>★ marks the best value of each column. ROUGE and BLEU are computed on characters.</p>
{curve}
<h2>Records</h2>
<div class="controls"><input id="filter" type="search" placeholder="filter: any text in the record">
<select id="sort"><option value="">original order</option>{options}</select><span id="count"></span></div>
<div id="records">{body}</div>
<script>{_JS}</script>
</body>
</html>
"""


def write_report(out_dir: str | Path, metrics_by_label: dict[str, dict], rows_by_label: dict[str, list[dict]],
                 train_dir: str | Path | None = None, subtitle: str = "") -> dict[str, Path]:
    """Write report.md, report.html and (with `train_dir`) loss_curve.png into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    records = compare_records(rows_by_label)
    written = {}
    if train_dir:
        written["loss_curve"] = plot_loss_curve(read_loss_log(train_dir), out_dir / LOSS_CURVE)
    png = written["loss_curve"].read_bytes() if "loss_curve" in written else None
    written["markdown"] = atomic_write_text(out_dir / "report.md", render_markdown(
        metrics_by_label, records, LOSS_CURVE if png else None, subtitle))
    written["html"] = atomic_write_text(out_dir / "report.html", render_html(metrics_by_label, records, png, subtitle))
    return written


def render_bench_html(title: str, description: str, tables: list[tuple[str, list[str], list[list[str]]]],
                      questions: list[tuple[str, str, str, dict[str, tuple[str | None, bool, str]]]]) -> str:
    """`medlora bench`'s report.html: its tables (title, header, rows), then every question (name, prompt, right
    letters, {model: (letters chosen or None, right, answer text)}), filterable by any text in it (`correct` and
    `wrong`, `unparseable` are written in each answer's head)."""
    blocks = []
    for caption, head, rows in tables:
        header = "".join(f"<th>{_h(cell)}</th>" for cell in head)
        body = "".join("<tr>" + "".join(f"<td>{_h(cell)}</td>" for cell in row) + "</tr>" for row in rows)
        blocks.append(f'<h3>{_h(caption)}</h3><table class="metrics"><thead><tr>{header}</tr></thead>'
                      f"<tbody>{body}</tbody></table>")
    records = []
    for number, (name, prompt, answer, chosen) in enumerate(questions, 1):
        parts = [f'<section class="record" data-order="{number}"><h3>#{number} {_h(name)}</h3>',
                 _html_field("Question", prompt), _html_field("Answer", answer, "golden"), '<div class="answers">']
        for label, (choice, right, text) in chosen.items():
            verdict = "correct" if right else "unparseable" if choice is None else "wrong"
            grade = " good" if right else " bad"
            parts.append(f'<div class="answer"><div class="head"><span>{_h(label)}</span><span class="score{grade}">'
                         f'{_h(choice or "-")} · {verdict}</span></div><div class="text">{_h(text)}</div></div>')
        records.append("".join(parts) + "</div></section>")
    return f"""<!DOCTYPE html>
<html lang="zh">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_h(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_h(title)}</h1>
<p class="subtitle">{_h(description)}</p>
{"".join(blocks)}
<h2>Questions</h2>
<div class="controls"><input id="filter" type="search" placeholder="filter: any text, e.g. wrong or a subset">
<select id="sort"><option value="">original order</option></select><span id="count"></span></div>
<div id="records">{"".join(records)}</div>
<script>{_JS}</script>
</body>
</html>
"""
