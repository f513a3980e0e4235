"""Property tests of data loading: a generated file either loads exactly as written, or raises one `DataError`
naming the file and the line or record (and the field): never another exception, never a silently dropped record.

Examples are few (the suite runs on two shared cores); the whole file takes well under 30 s.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medlora.data import FIELDS, load_records, validate_record
from medlora.errors import DataError

# MEDLORA_FUZZ_EXAMPLES=1000 for a deeper run
FUZZ = settings(max_examples=int(os.environ.get("MEDLORA_FUZZ_EXAMPLES", 40)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
LOCATED = re.compile(r": (line|record) \d+: ")

# --- strategies ----------------------------------------------------------------------------------------------

CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
# st.text() is any Unicode but surrogates: controls, U+2028, U+0085, BOMs, combining marks, emoji, ...
SHORT_TEXT = st.one_of(st.text(max_size=30), st.text(CJK, max_size=30))
HUGE_TEXT = st.builds(lambda char, n: char * n, st.characters(codec="utf-8"), st.integers(60_000, 200_000))
TEXT = st.one_of(SHORT_TEXT, SHORT_TEXT, SHORT_TEXT, HUGE_TEXT)
NON_BLANK = TEXT.filter(lambda s: s.strip())
JSON_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.text(SURROGATE, min_size=1,
                                                                                             max_size=2),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
MISSING = object()


@st.composite
def valid_records(draw, min_size=1, max_size=8) -> list[dict]:
    records = []
    for _ in range(draw(st.integers(min_size, max_size))):
        record = {"instruction": draw(NON_BLANK), "output": draw(NON_BLANK)}
        input_value = draw(st.one_of(st.just(MISSING), st.none(), TEXT))
        if input_value is not MISSING:
            record["input"] = input_value
        records.append(record)
    return records


def expected(records: list[dict]) -> list[dict]:
    return [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in records]


# --- writers: the formats a user hands in ----------------------------------------------------------------------

def write_file(folder: Path, fmt: str, records: list[dict], bom: bool, crlf: bool, blank_lines: bool) -> Path:
    newline = "\r\n" if crlf else "\n"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "data.parquet"
        pq.write_table(pa.Table.from_pylist([{f: r.get(f) for f in FIELDS} for r in records]), path)
        return path
    if fmt == "csv":
        buffer = io.StringIO()
        # csv quotes a value holding \r only when \r is in the line terminator: quote all with bare \n lines
        writer = csv.writer(buffer, lineterminator=newline, quoting=csv.QUOTE_MINIMAL if crlf else csv.QUOTE_ALL)
        writer.writerow(FIELDS)
        for record in records:
            writer.writerow([record.get(f) or "" for f in FIELDS])
            if blank_lines:
                buffer.write(newline)
        text, path = buffer.getvalue(), folder / "data.csv"
    elif fmt == "json_array":
        text, path = json.dumps(records, ensure_ascii=crlf, indent=2 if blank_lines else None), folder / "data.json"
        text = text.replace("\n", newline)  # string values hold \n only as an escape
    else:  # one object per line, as .jsonl or as Huatuo's llama_data.json
        lines = [json.dumps(r, ensure_ascii=bom) for r in records]
        text = (newline * (2 if blank_lines else 1)).join(lines) + newline
        path = folder / ("data.jsonl" if fmt == "jsonl" else "data.json")
    path.write_bytes((("\ufeff" if bom else "") + text).encode("utf-8"))
    return path


FORMATS = st.sampled_from(["jsonl", "json_lines", "json_array", "csv", "parquet"])


def assert_located(error: DataError, path: Path) -> None:
    """The message starts with the file and names a line or record."""
    message = str(error)
    assert message.startswith(f"{path}: "), message
    assert LOCATED.search(message) or message.endswith(("no records found", "(nested too deeply to read)")), message
    assert "\n" not in message


# --- properties ----------------------------------------------------------------------------------------------

@FUZZ
@given(valid_records(), FORMATS, st.booleans(), st.booleans(), st.booleans())
def test_valid_records_load_exactly_as_written(records, fmt, bom, crlf, blank_lines):
    with tempfile.TemporaryDirectory() as folder:
        path = write_file(Path(folder), fmt, records, bom, crlf, blank_lines)
        assert load_records(path) == expected(records)


@FUZZ
@given(st.lists(st.tuples(valid_records(1, 3), FORMATS), min_size=1, max_size=4))
def test_a_folder_loads_every_record_of_every_file_in_name_order(parts):
    with tempfile.TemporaryDirectory() as folder:
        for index, (records, fmt) in enumerate(parts):
            sub = Path(folder) / f"{index:02d}"
            sub.mkdir()
            write_file(sub, fmt, records, bom=False, crlf=False, blank_lines=False)
        assert load_records(folder) == [r for records, _ in parts for r in expected(records)]


def first_problem(row) -> str | None:
    """The contract, restated: '' for a non-object, the first bad field's name, or None when the row is valid."""
    if not isinstance(row, dict):
        return ""
    for name in FIELDS:
        value = row.get(name)
        if value is None:
            if name == "input":
                continue
            return name
        if not isinstance(value, str) or (name != "input" and not value.strip()):
            return name
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return name
    return None


@st.composite
def raw_rows(draw) -> list:
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 5)) == 0:
            rows.append(draw(JSON_JUNK))
            continue
        row = {}
        for name in FIELDS:
            value = draw(st.one_of(st.just(MISSING), NON_BLANK, NON_BLANK, JSON_JUNK, st.sampled_from(["", " \t"])))
            if value is not MISSING:
                row[name] = value
        rows.append(row)
    return rows


@FUZZ
@given(raw_rows(), st.booleans())
def test_wrong_types_nulls_and_junk_are_refused_at_the_first_bad_record(rows, as_array):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("data.json" if as_array else "data.jsonl")
        text = json.dumps(rows) if as_array else "".join(json.dumps(row) + "\n" for row in rows)
        path.write_text(text, encoding="utf-8")
        problems = [first_problem(row) for row in rows]
        bad = next((i for i, p in enumerate(problems) if p is not None), None)
        if bad is None:
            assert load_records(path) == [validate_record(row, "") for row in rows]
            return
        with pytest.raises(DataError) as caught:
            load_records(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: {'record' if as_array else 'line'} {bad + 1}: "), message
        what = "a record must be a JSON object" if problems[bad] == "" else f"field '{problems[bad]}'"
        assert what in message


def jsonl_bytes(records: list[dict], crlf: bool) -> bytes:
    newline = "\r\n" if crlf else "\n"
    return "".join(json.dumps(r, ensure_ascii=False) + newline for r in records).encode("utf-8")


@FUZZ
@given(valid_records(2, 6), st.booleans(), st.data())
def test_a_truncated_file_loads_its_whole_lines_or_names_the_cut_line(records, crlf, data):
    raw = jsonl_bytes(records, crlf)
    cut = data.draw(st.integers(1, len(raw)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cut.jsonl"
        path.write_bytes(raw[:cut])
        pieces = raw[:cut].split(b"\n")
        whole = raw[:cut].count(b"\n")
        last = pieces[-1].rstrip(b"\r")
        complete_last = last == json.dumps(records[whole], ensure_ascii=False).encode() if last else False
        if last and not complete_last:
            with pytest.raises(DataError) as caught:
                load_records(path)
            assert str(caught.value).startswith(f"{path}: line {whole + 1}: "), str(caught.value)
        else:
            assert load_records(path) == expected(records[:whole + complete_last])


def count_nonblank_lines(raw: bytes) -> int:
    return sum(1 for line in raw.split(b"\n") if line.decode("utf-8").lstrip("\ufeff").strip())


def load_or_locate(damaged: bytes, name: str) -> list[dict] | None:
    """The records of `damaged` written to a file called `name`, or None after checking that the DataError it
    raised names that file and the place."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(damaged)
        try:
            return load_records(path)
        except DataError as error:
            assert_located(error, path)
            return None


@FUZZ
@given(valid_records(1, 5), st.booleans(), st.binary(min_size=1, max_size=6), st.sampled_from(["insert", "replace"]),
       st.data())
def test_damaged_bytes_never_drop_a_record_silently(records, crlf, junk, how, data):
    raw = jsonl_bytes(records, crlf)
    at = data.draw(st.integers(0, len(raw) - 1))
    damaged = raw[:at] + junk + raw[at + (len(junk) if how == "replace" else 0):]
    loaded = load_or_locate(damaged, "damaged.jsonl")
    if loaded is not None:
        assert len(loaded) == count_nonblank_lines(damaged)


@FUZZ
@given(valid_records(1, 5), st.binary(min_size=1, max_size=6), st.data())
def test_damaged_csv_loads_every_row_or_names_a_line(records, junk, data):
    buffer = io.StringIO()
    csv.writer(buffer).writerows([FIELDS, *([r.get(f) or "" for f in FIELDS] for r in records)])
    raw = buffer.getvalue().encode("utf-8")
    at = data.draw(st.integers(0, len(raw) - 1))
    damaged = raw[:at] + junk + raw[at:]
    loaded = load_or_locate(damaged, "damaged.csv")
    if loaded is not None:
        rows = list(csv.reader(io.StringIO(damaged.decode("utf-8").lstrip("\ufeff"), newline="")))
        assert len(loaded) == sum(1 for row in rows[1:] if row)


@FUZZ
@given(st.lists(st.text(st.one_of(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FA5),  # all in GBK
                                 st.characters(max_codepoint=0x7F)), min_size=1, max_size=20)
                .filter(lambda s: s.strip()), min_size=1, max_size=4),
       st.sampled_from(["gbk", "gb18030"]), st.sampled_from([".jsonl", ".json", ".csv"]))
def test_gbk_files_load_when_ascii_or_are_refused_with_the_encoding_hint(texts, encoding, suffix):
    records = [{"instruction": text, "output": text} for text in texts]
    if suffix == ".csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerows([["instruction", "output"], *([t, t] for t in texts)])
        text = buffer.getvalue()
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(text.encode(encoding))
        try:
            loaded = load_records(path)
        except DataError as error:
            assert_located(error, path)
            assert "not valid UTF-8" in str(error)  # the exact GBK hint is checked on tests/data/bad files
            return
        assert len(loaded) == len(records)  # ASCII only, or GBK bytes that happen to be valid UTF-8 too


@settings(max_examples=150, deadline=None)
@given(st.one_of(JSON_JUNK, st.dictionaries(st.sampled_from([*FIELDS, "问题", "x"]), JSON_JUNK | TEXT, max_size=4)),
       st.booleans(), st.sampled_from([None, "instruction=问题", {"output": "x"}]))
def test_validate_record_raises_data_error_or_returns_three_strings(row, require_output, columns):
    from medlora.data import parse_columns

    try:
        record = validate_record(row, "f.jsonl: line 1", require_output, parse_columns(columns))
    except DataError as error:
        assert str(error).startswith("f.jsonl: line 1: ")
        return
    assert list(record) == list(FIELDS) and all(isinstance(v, str) for v in record.values())
