"""Standard Chinese medical multiple-choice benchmarks (XMedBench-zh and files of the same shape), scored the way
their field scores them: by the log-likelihood of each option letter, or by parsing a generated answer.

A benchmark file holds one question a record (JSONL, or a JSON array as Apollo's `zh.json`):
`{"question": str, "options": ..., "answer": ...}` where options are a string with one option a line (`(A) …` or
`A. …`), a {letter: text} object or a list (lettered A, B, …), and the answer is the letter or letters (`D`, `(D)`,
`BCD`, `["B", "C"]`). A question with several answers is right only when exactly that set is chosen.

Scoring (docs/benchmarks-medical.md):
- `loglik` (lm-evaluation-harness's way): the prompt (instruction, question, options, rendered with the model's
  template) then the answer cue `答案:`; the chosen letter is the one whose token (` A`, ` B`, …) is the most likely
  continuation. One forward pass per question; no parsing. A single letter cannot equal a set, so a question with
  several answers is wrong under loglik: how many there are is reported beside the accuracy.
- `generate`: the model answers the same prompt (without the cue) in its own form, greedily, and `parse_answer`
  reads the letters; an answer that names no offered letter is counted as unparseable (and wrong), and reported.
"""

from __future__ import annotations

import logging
import random
import re
import time
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

from medlora.errors import ConfigError, DataError

log = logging.getLogger("medlora")

REPO_DATA = Path(__file__).resolve().parents[2] / "data" / "benchmarks"
# XMedBench-zh (FreedomIntelligence/Apollo, metadata/test/zh.json): its four subsets, in Apollo's order. The two whose
# licences allow it are committed (data/benchmarks/README.md); the others are read from --benchmark_dir.
XMEDBENCH_ZH = ("medqa-mcmle", "cmb-single", "cmexam", "cmmlu-medical")
COMMITTED = {"medqa-mcmle": "xmedbench-zh/medqa-mcmle.jsonl", "cmb-single": "xmedbench-zh/cmb-single.jsonl"}
SUITES = {"xmedbench-zh": XMEDBENCH_ZH}
LOCAL_DIR = REPO_DATA / "local"  # where --benchmark_dir defaults to: git-ignored, for files we may not commit
APOLLO_COMBINED = "zh.json"  # Apollo's one file of all four subsets, told apart by each record's `source`
# CMMLU's medical subjects (XMedBench-zh's cmmlu-medical), readable from CMMLU's own CSVs (`,Question,A,B,C,D,Answer`)
CMMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_medicine", "genetics", "nutrition",
                 "traditional_chinese_medicine", "virology")

# Our own wording (the sources' prompts were read, not copied): one instruction for every subset, and one for a set
# whose questions may have several answers.
INSTRUCTION = "以下是一道医学考试的选择题，请选出正确的选项。"
INSTRUCTION_SEVERAL = "以下是一道医学考试的选择题，正确的选项可能不止一个，请选出全部正确的选项。"
ANSWER_CUE = "答案:"  # the line medlora's data ends a multiple-choice answer with (`答案: B`); a letter follows a space
SCORINGS = ("loglik", "generate")
LETTER_CHARS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Question:
    subset: str
    number: int  # the record's position in its file (or folder of CMMLU's files), from 1
    question: str
    options: dict[str, str]  # letter -> text, A, B, … in order
    answer: str  # the right letters, sorted ("D", "BCD")
    several: bool = False  # its set has questions with several answers (they get INSTRUCTION_SEVERAL)
    examples: tuple["Question", ...] = ()  # solved questions of its subset shown before it (few-shot, --shots)

    @property
    def chance(self) -> float:
        """What a uniform guess of one letter scores on it."""
        return 1 / len(self.options) if len(self.answer) == 1 else 0.0


@dataclass
class Subset:
    name: str
    source: str  # the file read (and, for Apollo's combined file, the source kept)
    total: int  # questions in the file
    questions: list[Question] = field(default_factory=list)  # those asked (a seeded sample with --limit)


# --- reading ----------------------------------------------------------------------------------------------------


def read_questions(path: str | Path, subset: str, source: str | None = None) -> list[Question]:
    """The checked questions of a benchmark file (only the records whose `source` is `source`, when given)."""
    path = Path(path)
    questions = []
    for where, number, record in _records(path):
        if source is None or record.get("source") == source:
            questions.append(_question(record, subset, f"{path}, {where}", number))
    if not questions:
        raise DataError(f"{path}: no questions" + (f" with source {source!r}" if source else ""))
    several = any(len(q.answer) > 1 for q in questions)
    return [replace(q, several=several) for q in questions]


def _records(path: Path) -> list[tuple[str, int, dict]]:
    """(where in the file, its position from 1, the record) for each record of a data file as medlora.data reads
    them (JSONL, a JSON array, CSV; CMMLU's CSV columns `,Question,A,B,C,D,Answer` are understood) or of a folder of
    CMMLU's CSVs (its medical subjects, `anatomy.csv, line 3`, numbered on across the files)."""
    from medlora.data import read_rows

    if path.is_dir():
        items = [(f"{subject}.csv, {where}", record) for subject in CMMLU_MEDICAL
                 for where, _, record in _records(path / f"{subject}.csv")]
    else:
        items = list(read_rows(path))
    records = []
    for number, (where, record) in enumerate(items, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path}, {where}: a question must be a JSON object with question, options and answer")
        if "question" not in record and "Question" in record:  # CMMLU's columns
            record = {"question": record["Question"], "answer": record.get("Answer"),
                      "options": {x: record[x] for x in LETTER_CHARS if record.get(x) is not None}}
        records.append((where, number, record))
    return records


def _question(record: dict, subset: str, where: str, number: int) -> Question:
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string")
    options = parse_option_field(record.get("options"), where)
    answer = parse_answer_field(record.get("answer"), options, where)
    return Question(subset, number, question.strip(), options, answer)


_OPTION_LINE = re.compile(r"^\s*[(（]?([A-J])\s*[)）.．、:：]\s*(.*?)\s*$")  # `(A) 甲`, `A. 甲`, `A、甲`


def parse_option_field(value, where: str) -> dict[str, str]:
    """{letter: text} from a string with one option a line (`(A) …`, `A. …`), a {letter: text} object or a list."""
    if isinstance(value, str):
        options = {}
        for line in value.strip().splitlines():
            match = _OPTION_LINE.match(line)
            if not match:
                raise DataError(f"{where}: field 'options': the line {line.strip()[:40]!r} is not an option like "
                                f"'(A) text' or 'A. text'")
            options[match.group(1)] = match.group(2)
    elif isinstance(value, dict):
        options = {str(k).strip().upper(): v for k, v in value.items()}
    elif isinstance(value, list):
        options = dict(zip(LETTER_CHARS, value))
        if len(value) > len(LETTER_CHARS):
            raise DataError(f"{where}: field 'options' has {len(value)} options; at most {len(LETTER_CHARS)}")
    else:
        raise DataError(f"{where}: field 'options' must be a string, an object or a list")
    letters = "".join(options)
    if len(options) < 2 or letters != LETTER_CHARS[:len(options)]:
        raise DataError(f"{where}: field 'options' must hold two or more options lettered A, B, C, … in order "
                        f"(got {letters or 'none'})")
    if not all(isinstance(text, str) and text.strip() for text in options.values()):
        raise DataError(f"{where}: field 'options': every option needs a non-empty text")
    return {letter: text.strip() for letter, text in options.items()}


def parse_answer_field(value, options: dict[str, str], where: str) -> str:
    """The right letters, sorted: from `D`, `(D)`, `BCD`, `B, C`, `["B", "C"]`."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "".join(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field 'answer' must be the right option letter(s), e.g. \"D\" or \"BCD\"")
    letters = re.sub(r"[\s()（）\[\]【】,，、]", "", unicodedata.normalize("NFKC", value)).upper()
    if not letters or not letters.isalpha() or len(set(letters)) != len(letters):
        raise DataError(f"{where}: field 'answer' {value!r} must be option letters, each once, e.g. \"D\" or \"BCD\"")
    unoffered = [letter for letter in letters if letter not in options]
    if unoffered:
        raise DataError(f"{where}: field 'answer' names {''.join(unoffered)}, which is not an option "
                        f"(A-{list(options)[-1]})")
    return "".join(sorted(letters))


def resolve(specs: list[str], benchmark_dir: str | None = None) -> list[tuple[str, Path, str | None]]:
    """(subset name, file, source to keep or None) for each `--benchmark`: a suite (xmedbench-zh), one of its subsets,
    NAME=FILE or a FILE (named by its stem). A subset we do not commit is found in `benchmark_dir` (default
    data/benchmarks/local) as `<name>.jsonl` or in Apollo's combined `zh.json`."""
    resolved, names = [], set()
    for spec in specs or ["xmedbench-zh"]:
        name, sep, path = spec.partition("=")
        if sep and name and not Path(spec).exists():
            found = [(name.strip(), Path(path), None)]
        elif spec in SUITES:
            found = [_builtin(subset, benchmark_dir) for subset in SUITES[spec]]
        elif spec in XMEDBENCH_ZH:
            found = [_builtin(spec, benchmark_dir)]
        elif Path(spec).is_file():
            found = [(Path(spec).stem, Path(spec), None)]
        else:
            raise ConfigError(f"--benchmark {spec!r}: not a benchmark ({', '.join([*SUITES, *XMEDBENCH_ZH])}) nor a "
                              f"file; give NAME=FILE for a file of questions")
        for subset, path, source in found:
            if not subset or subset in names:
                raise ConfigError(f"--benchmark: the subset name {subset!r} is empty or given twice; name files "
                                  f"with NAME=FILE")
            names.add(subset)
            resolved.append((subset, path, source))
    return resolved


def _builtin(subset: str, benchmark_dir: str | None) -> tuple[str, Path, str | None]:
    if subset in COMMITTED and (REPO_DATA / COMMITTED[subset]).is_file():
        return subset, REPO_DATA / COMMITTED[subset], None
    folder = Path(benchmark_dir) if benchmark_dir else LOCAL_DIR
    if (folder / f"{subset}.jsonl").is_file():
        return subset, folder / f"{subset}.jsonl", None
    if subset == "cmmlu-medical":  # CMMLU's own CSVs, as its repository lays them out, or the folder of them
        for csvs in (folder / "cmmlu" / "test", folder / "test", folder):
            if all((csvs / f"{name}.csv").is_file() for name in CMMLU_MEDICAL):
                return subset, csvs, None
    if (folder / APOLLO_COMBINED).is_file():
        return subset, folder / APOLLO_COMBINED, subset
    why = ("is not committed (its licence does not allow redistribution)" if subset not in COMMITTED else
           "is missing (medlora installed without the repository's data/ folder)")
    cmmlu = " nor CMMLU's test/*.csv" if subset == "cmmlu-medical" else ""
    raise ConfigError(f"--benchmark {subset}: the file {why} and {folder} holds neither {subset}.jsonl nor Apollo's "
                      f"{APOLLO_COMBINED}{cmmlu}; give --benchmark_dir DIR or {subset}=FILE (how to get it: "
                      f"data/benchmarks/README.md), or leave the subset out")


def load_subsets(specs: list[str], benchmark_dir: str | None = None, limit: int = 0, seed: int = 42,
                 shots: int = 0) -> list[Subset]:
    """The subsets named by `specs`, read and checked, each cut to a seeded sample of `limit` questions (0: all).
    A subset's sample depends on its name and the seed only, so adding a subset leaves the others' alone. With
    `shots`, that many of a subset's questions (drawn first, seeded) are shown solved before each of its questions
    and never asked; the sample is drawn from the rest (with 0 shots, the same sample as without)."""
    if shots < 0:
        raise ConfigError("--shots must be 0 (zero-shot) or more")
    subsets = []
    for name, path, source in resolve(specs, benchmark_dir):
        questions = read_questions(path, name, source)
        pool = list(range(len(questions)))
        examples = ()
        if shots:
            if shots >= len(questions):
                raise ConfigError(f"--shots {shots}: {name} has only {len(questions)} questions")
            taken = set(random.Random(f"{seed}:{name}:shots").sample(pool, shots))
            examples = tuple(questions[i] for i in sorted(taken))
            pool = [i for i in pool if i not in taken]
        if 0 < limit < len(pool):
            pool = [pool[i] for i in sorted(random.Random(f"{seed}:{name}").sample(range(len(pool)), limit))]
        chosen = [replace(questions[i], examples=examples) if examples else questions[i] for i in pool]
        where = f"{path} (source {source})" if source else str(path)
        subsets.append(Subset(name, where, len(questions), chosen))
    return subsets


# --- prompts and answers ------------------------------------------------------------------------------------------


def question_prompt(q: Question) -> str:
    """The user's turn: the instruction, the solved examples (each question, its options and `答案: X`), then the
    question and its options, one a line."""
    lines = [INSTRUCTION_SEVERAL if q.several else INSTRUCTION]
    for example in q.examples:
        lines += [*_question_lines(example), f"{ANSWER_CUE} {example.answer}", ""]
    return "\n".join(lines + _question_lines(q))


def _question_lines(q: Question) -> list[str]:
    return [q.question, *(f"{letter}. {text}" for letter, text in q.options.items())]


def model_prompt(generator, q: Question) -> str:
    """`q`'s prompt in the model's template; with knowledge, the facts retrieved for the question and its options
    only, not for the examples before it."""
    facts = generator.lookup(question_prompt(replace(q, examples=())))
    return generator.build_prompt(question_prompt(q), retrieved=facts)


def letter_continuation(letter: str) -> str:
    """What follows ANSWER_CUE for a letter: a space and the letter, as `答案: B` is written (and tokenised)."""
    return f" {letter}"


_SEVERAL = re.compile(r"(?:答案|选)\s*(?:应该|应)?\s*(?:是|为|选|择)?\s*[:：]?\s*[(（\[【]?\s*"
                      r"([A-J](?:[ \t]*[、,，和及]?[ \t]*[A-J])+)(?![A-Za-z])")


def _without_option_lists(text: str, options: dict[str, str]) -> str:
    """`text` without its lines that list options (`A. …` / `(B) …`, two or more of them): a base model goes on
    restating the question's options, and a list that begins with `A. …` chooses nothing (one such line does)."""
    lines = text.splitlines()
    listing = [i for i, line in enumerate(lines)
               if (match := _OPTION_LINE.match(line)) and match.group(1) in options]
    return "\n".join(line for i, line in enumerate(lines) if i not in listing) if len(listing) > 1 else text


def parse_answer(text: str, options: dict[str, str]) -> str | None:
    """The letters a generated answer chooses, sorted, or None when it names no offered option (unparseable).

    Several letters are read from the last `答案: BCD` / `答案为B、D` / `选AC`; one letter by medlora.eval.mcq's
    `extract_choice` (the last `答案` line, `故选E`, a bare or leading letter, `B项`, `(D)`, or the one option whose
    text the answer copies back); a restated option list (`选项: 甲(A)、乙(B)…` or `A. …` lines) chooses nothing."""
    from medlora.eval.mcq import extract_choice

    said = _without_option_lists(unicodedata.normalize("NFKC", text or ""), options)
    several = _SEVERAL.findall(said)
    if several:
        letters = "".join(sorted(set(re.sub(r"[^A-J]", "", several[-1]))))
        if len(letters) > 1 and all(letter in options for letter in letters):
            return letters
    choice = extract_choice(said, "", options)
    return choice if choice in options else None


# --- scoring -------------------------------------------------------------------------------------------------------


def score_loglik(generator, questions: list[Question], batch_size: int = 8) -> list[dict]:
    """Each question's letter log-likelihoods after its prompt and the answer cue, and the letter chosen (the most
    likely; the first of a tie)."""
    from medlora.config import GenerationArgs
    from medlora.loglik import continuation_logprobs

    tokenizer = generator.tokenizer
    prompts = [model_prompt(generator, q) + ANSWER_CUE for q in questions]
    letters = {letter for q in questions for letter in q.options}
    cont = {letter: tokenizer(letter_continuation(letter), add_special_tokens=False)["input_ids"] for letter in letters}
    # cut like a generated answer's prompt (the oldest tokens go), leaving room for the longest letter's tokens
    contexts = generator.prompt_ids(prompts, GenerationArgs(max_new_tokens=max(len(ids) for ids in cont.values())))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = continuation_logprobs(generator.model, contexts, [[cont[letter] for letter in q.options]
                                                               for q in questions], pad, batch_size)
    rows = []
    for q, mine in zip(questions, scores):
        by_letter = dict(zip(q.options, mine))
        choice = max(by_letter, key=by_letter.get)
        rows.append(result_row(q, choice, scores={k: round(v, 4) for k, v in by_letter.items()}))
    return rows


def score_generate(generator, questions: list[Question], gen, batch_size: int = 8) -> list[dict]:
    """Each question's generated answer and the letters `parse_answer` reads from it (None: unparseable)."""
    prompts = [model_prompt(generator, q) for q in questions]
    answers = generator.generate(prompts, gen, batch_size=batch_size, progress=True)
    return [result_row(q, parse_answer(a.text, q.options), output=a.text, cut_off=not a.ended_by_eos)
            for q, a in zip(questions, answers)]


def result_row(q: Question, choice: str | None, **extra) -> dict:
    """One question's result: right only when the letters chosen (sorted) are exactly its answer's set."""
    return {"subset": q.subset, "number": q.number, "answer": q.answer, "choice": choice,
            "correct": choice == q.answer, **extra}


def run_models(margs, adapters: list[tuple[str, str]], subsets: list[Subset], scoring: str, gen=None,
               batch_size: int = 8, prompt=None, base_knowledge: str | None = None
               ) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """The base model (and, with `base_knowledge`, the base prompted with the facts retrieved from that source,
    labelled base+knowledge), then each adapter merged into a fresh copy of it, on every question of `subsets`:
    ({label: result rows}, {label: what the model was and how long it took}). `prompt` (PromptArgs): the template,
    knowledge and system text for every model, else each adapter's own. Retrieval reads the whole question, so an
    option that names a knowledge-base disease brings that disease's facts too."""
    from dataclasses import replace as with_fields

    from medlora.config import PromptArgs
    from medlora.eval.runner import BASE_KNOWLEDGE_LABEL
    from medlora.generate import Generator
    from medlora.loader import recorded_knowledge
    from medlora.modeling import preflight_adapter

    if scoring not in SCORINGS:
        raise ConfigError(f"--scoring {scoring!r}: expected one of {', '.join(SCORINGS)}")
    for _, path in adapters:  # refuse a bad adapter before spending time on the base model
        preflight_adapter(path, margs.base_model, margs.allow_pickle, margs.trust_remote_code)
    prompt = prompt or PromptArgs()
    runs = [("base", None, prompt)]
    if base_knowledge:
        runs.append((BASE_KNOWLEDGE_LABEL, None, with_fields(prompt, knowledge=base_knowledge)))
    runs += [(label, path, prompt) for label, path in adapters]
    questions = [q for subset in subsets for q in subset.questions]
    rows_by_label, models = {}, {}
    for label, path, asked in runs:
        generator = Generator.load(margs, path, asked, merge=True)
        log.info("bench: %s on %d questions (%s)", label, len(questions), scoring)
        started = time.perf_counter()
        if scoring == "loglik":
            rows_by_label[label] = score_loglik(generator, questions, batch_size)
        else:
            rows_by_label[label] = score_generate(generator, questions, gen, batch_size)
        models[label] = {"base_model": margs.base_model, "adapter": path, "template": generator.template.name,
                         "knowledge": asked.knowledge or (recorded_knowledge(path) if path else None) or "none",
                         "seconds": round(time.perf_counter() - started, 1)}
        del generator
    return rows_by_label, models


# --- figures ---------------------------------------------------------------------------------------------------------


def summarise(subsets: list[Subset], rows_by_label: dict[str, list[dict]], scoring: str) -> dict:
    """Accuracy per subset and overall (all questions asked, pooled) for each model, beside chance and the count of
    questions with several answers; with `generate`, the unparseable and cut-off answers."""
    sets = {}
    for subset in [*subsets, None]:
        questions = [q for s in subsets for q in s.questions] if subset is None else subset.questions
        name = "overall" if subset is None else subset.name
        sets[name] = {"questions": len(questions), "chance": _mean([q.chance for q in questions]),
                      "several_answers": sum(len(q.answer) > 1 for q in questions)}
        if subset is not None:
            sets[name].update(file=subset.source, in_file=subset.total)
    models = {}
    for label, rows in rows_by_label.items():
        figures = {}
        for name in sets:
            mine = [r for r in rows if name == "overall" or r["subset"] == name]
            figures[name] = {"n": len(mine), "correct": sum(r["correct"] for r in mine),
                             "accuracy": _mean([float(r["correct"]) for r in mine])}
            if scoring == "generate":
                figures[name].update(unparseable=sum(r["choice"] is None for r in mine),
                                     cut_off=sum(bool(r.get("cut_off")) for r in mine))
        models[label] = figures
    return {"sets": sets, "accuracy": models}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def table_cells(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """The accuracy table: a row per subset and overall, a column per model (and, with generate, the unparseable
    answers of each)."""
    labels = list(metrics["accuracy"])
    generate = metrics["scoring"] == "generate"
    head = ["set", "questions", "chance", *labels] + ([f"{label} unparseable" for label in labels] if generate else [])
    rows = []
    for name, info in metrics["sets"].items():
        cells = [name, str(info["questions"]), _fmt(info["chance"])]
        cells += [_fmt(metrics["accuracy"][label][name]["accuracy"]) for label in labels]
        if generate:
            cells += [str(metrics["accuracy"][label][name]["unparseable"]) for label in labels]
        rows.append(cells)
    return head, rows


def table_lines(metrics: dict) -> list[str]:
    """The accuracy table in Markdown, overall in bold."""
    head, rows = table_cells(metrics)
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for cells in rows:
        cells = [f"**{cells[0]}**" if cells[0] == "overall" else cells[0], *cells[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_report(metrics: dict) -> str:
    """report.md: how the figures were made, the table, the models and the sets."""
    lines = ["# medlora bench", "", describe(metrics), "", *table_lines(metrics), "",
             "Chance: a uniform guess of one letter. A question with several answers is right only when exactly its "
             "set is chosen" + (" (never, under loglik, which chooses one letter)" if metrics["scoring"] == "loglik"
                                else "") + ".", "", "## Models", "",
             "| model | base | adapter | template | knowledge | seconds |", "|---|---|---|---|---|---:|"]
    for label, info in metrics["models"].items():
        lines.append(f"| {label} | {info['base_model']} | {info['adapter'] or '-'} | {info['template']} | "
                     f"{info['knowledge']} | {info['seconds']} |")
    lines += ["", "## Sets", "", "| set | file | questions in file | asked | several answers |",
              "|---|---|---:|---:|---:|"]
    for name, info in metrics["sets"].items():
        if name != "overall":
            lines.append(f"| {name} | {info['file']} | {info['in_file']} | {info['questions']} | "
                         f"{info['several_answers']} |")
    if metrics["scoring"] == "generate":
        cut = ", ".join(f"{label} {m['overall']['cut_off']}" for label, m in metrics["accuracy"].items())
        lines += ["", f"Answers cut off at {metrics['generation']['max_new_tokens']} new tokens: {cut}."]
    return "\n".join(lines) + "\n"


def render_html(metrics: dict, subsets: list[Subset], rows_by_label: dict[str, list[dict]]) -> str:
    """report.html: the accuracy and models tables, then every question with each model's choice (and, with
    generate, its answer), filterable."""
    from medlora.eval.report import render_bench_html

    head, rows = table_cells(metrics)
    models = [[label, info["base_model"], info["adapter"] or "-", info["template"], info["knowledge"],
               str(info["seconds"])] for label, info in metrics["models"].items()]
    tables = [("Accuracy", head, rows),
              ("Models", ["model", "base", "adapter", "template", "knowledge", "seconds"], models)]
    by_key = {label: {(r["subset"], r["number"]): r for r in label_rows} for label, label_rows in rows_by_label.items()}
    questions = []
    for q in (q for subset in subsets for q in subset.questions):
        chosen = {}
        for label, mine in by_key.items():
            row = mine[(q.subset, q.number)]
            scores = row.get("scores")
            text = row.get("output") or ("  ".join(f"{k} {v:.2f}" for k, v in scores.items()) if scores else "")
            chosen[label] = (row["choice"], row["correct"], text)
        answer = "、".join(f"{letter}. {q.options[letter]}" for letter in q.answer)
        questions.append((f"{q.subset} {q.number}", question_prompt(q), answer, chosen))
    return render_bench_html("medlora bench", describe(metrics), tables, questions)


def describe(metrics: dict) -> str:
    sample = (f"a seeded sample of {metrics['limit']} questions per set (seed {metrics['seed']})"
              if metrics["limit"] else "every question")
    how = ("the most likely option letter after the prompt and `答案:` (loglik)" if metrics["scoring"] == "loglik"
           else "letters parsed from a generated answer (generate: " +
           ", ".join(f"{k} {v}" for k, v in metrics["generation"].items()) + ")")
    shots = metrics.get("shots") or 0
    shown = f"{shots} solved questions of the same subset before each (never scored)" if shots else "zero-shot"
    return f"Benchmarks {', '.join(metrics['benchmarks'])}: {sample}, {shown}; scored by {how}."
