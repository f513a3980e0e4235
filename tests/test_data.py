import csv
import json

import pytest

from medlora.data import load_records, split_records
from medlora.errors import DataError
from conftest import SHARED_DATA, TINY_RECORDS

EXPECTED = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in TINY_RECORDS]


def write_jsonl(path, rows, newline_at_end=True):
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + ("\n" if newline_at_end else "")
    path.write_text(text, encoding="utf-8")
    return path


def test_json_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(TINY_RECORDS, ensure_ascii=False, indent=2), encoding="utf-8")
    assert load_records(path) == EXPECTED


def test_jsonl_under_json_name_without_final_newline(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", TINY_RECORDS, newline_at_end=False)
    assert load_records(path) == EXPECTED


def test_jsonl_with_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in TINY_RECORDS]
    path.write_bytes(("\ufeff" + "\r\n".join(lines[:3]) + "\r\n\r\n" + "\r\n".join(lines[3:])).encode("utf-8"))
    assert load_records(path) == EXPECTED


def test_csv_and_parquet_and_folder(tmp_path):
    with (tmp_path / "a.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(TINY_RECORDS[:4])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(TINY_RECORDS[4:]), tmp_path / "b.parquet")
    assert load_records(tmp_path / "a.csv") == EXPECTED[:4]
    assert load_records(tmp_path / "b.parquet") == EXPECTED[4:]
    assert load_records(tmp_path) == EXPECTED  # a folder: its files in name order


def test_input_is_optional(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "问", "output": "答"}])
    assert load_records(path) == [{"instruction": "问", "input": "", "output": "答"}]


def test_columns_mapping_for_chinese_headers(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeff问题,回答\r\n感冒怎么办？,多休息。\r\n".encode("utf-8"))
    records = load_records(path, columns="instruction=问题,output=回答")
    assert records == [{"instruction": "感冒怎么办？", "input": "", "output": "多休息。"}]


@pytest.mark.skipif(not (SHARED_DATA / "huatuo").exists(), reason="../shared/data/huatuo is absent")
def test_huatuo_files_load():
    assert len(load_records(SHARED_DATA / "huatuo" / "infer.json")) == 5
    assert len(load_records(SHARED_DATA / "huatuo" / "llama_data.json")) == 8658


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "问"}', "line 2: field 'output' is missing"),
    ('{"instruction": "问", "output": null}', "line 2: field 'output' is null"),
    ('{"instruction": "问", "output": "  "}', "line 2: field 'output' is empty"),
    ('{"instruction": 3, "output": "答"}', "line 2: field 'instruction' must be a string, got int"),
    ('{"instruction": "问", "input": ["x"], "output": "答"}', "line 2: field 'input' must be a string, got list"),
    ('{"instruction": "问", "output": "答"', "line 2: invalid JSON (Expecting ',' delimiter at column 35)"),
    ('["问", "答"]', "line 2: a record must be a JSON object, got list"),
])
def test_bad_records_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "好", "output": "好"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value) == f"{path}: {message}"


def test_bad_record_in_json_array_names_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json: record 2: field 'output' is missing"):
        load_records(path)


def test_output_optional_for_inference(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "问"}])
    assert load_records(path, require_output=False)[0]["output"] == ""


def test_missing_path_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_records(tmp_path / "nope.json")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.jsonl: the file is empty \(0 bytes\)"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_records(tmp_path / "d")


def test_gbk_file_gets_an_encoding_hint(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(json.dumps({"instruction": "感冒", "output": "休息"}, ensure_ascii=False).encode("gbk"))
    with pytest.raises(DataError, match="GBK/GB18030.*iconv -f GB18030 -t UTF-8"):
        load_records(path)


def test_split_is_seeded_and_sized():
    records = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(100)]
    train, val = split_records(records, 10, seed=1)
    assert len(train) == 90 and len(val) == 10
    assert split_records(records, 10, seed=1) == (train, val)
    assert split_records(records, 10, seed=2)[1] != val
    assert len(split_records(records, 0.25, seed=1)[1]) == 25
    assert {r["instruction"] for r in train}.isdisjoint({r["instruction"] for r in val})
    with pytest.raises(DataError, match="leaves no training records"):
        split_records(records, 100)


@pytest.mark.parametrize("spec, message", [
    ("instruction=问题,output=问题", "column '问题' is mapped twice"),
    ("instruction=问题,instruction=题目", "field 'instruction' is given two columns"),
])
def test_columns_mapped_twice_are_refused(spec, message):
    from medlora.data import parse_columns
    from medlora.errors import DataError

    with pytest.raises(DataError, match=message):
        parse_columns(spec)


def test_a_record_with_two_conversations_is_refused(tmp_path):
    from medlora.data import load_records
    from medlora.errors import DataError

    path = write_jsonl(tmp_path / "both.jsonl", [
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}],
         "messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}])
    with pytest.raises(DataError, match="line 1: the record has both 'conversations' and 'messages'"):
        load_records(path)


def test_a_whitespace_response_split_is_refused(tmp_path):
    from medlora.errors import TemplateError
    from medlora.templates import load_template

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"prompt_input": "{instruction}{input}", "prompt_no_input": "{instruction}",
                                "response_split": " "}), encoding="utf-8")
    with pytest.raises(TemplateError, match="only whitespace"):
        load_template(str(path))


def test_lone_surrogates_are_refused_in_every_text_a_record_carries(tmp_path):
    """data.check_encodable, the one rule for broken text, covers the facts a preference pair carries and the
    text of OpenAI content parts too (instruction/input/output, system, history and turns had it already)."""
    rows = [{"prompt": "问", "chosen": "甲", "rejected": "乙", "knowledge": "事实\ud800"},
            {"prompt": [{"role": "user", "content": "问"}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "甲"}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "乙\udc00"}]}]}]
    for number, row in enumerate(rows, start=1):
        path = tmp_path / f"pairs{number}.jsonl"
        path.write_text(json.dumps(row) + "\n", encoding="utf-8")  # \u escapes: the file itself is valid UTF-8
        with pytest.raises(DataError, match="line 1: field '(knowledge|rejected)'.*unpaired surrogate"):
            load_records(path, pairs=True)
    rows[1]["rejected"][0]["content"][0]["text"] = "乙"
    path.write_text(json.dumps(rows[1]) + "\n", encoding="utf-8")
    [pair] = load_records(path, pairs=True)
    assert (pair["instruction"], pair["output"], pair["rejected"]) == ("问", "甲", "乙")
