"""Load and validate instruction records: `{"instruction", "input", "output"}`, plus `history` (earlier
(user, assistant) turns) and `system` for conversations.

Formats (`--data_format`, auto-detected per file from its first record):
- alpaca: instruction/input/output, with optional `history` ([[user, assistant], ...]) and `system` (LLaMA-Factory);
- sharegpt: `conversations` of {"from": human|gpt|system, "value"} (MedicalGPT, LLaMA-Factory);
- messages: `messages` of {"role": user|assistant|system, "content"} (OpenAI, TRL's conversational format).
A conversation becomes one record: its last user turn is the instruction, the assistant's answer to it the output,
the turns before it the history.

Sources: `.json` (a JSON array, or one object per line as in Huatuo's `llama_data.json`), `.jsonl`, `.csv`,
`.parquet`, a folder of such files, or a dataset name for `datasets.load_dataset`. Every record is checked;
a bad one raises `DataError` naming the file, the line or record number and the field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from medlora.errors import DataError
from medlora.turns import conversation_turns

logger = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
FIELDS = ("instruction", "input", "output")
CONVERSATION_FIELDS = ("history", "system", "conversations", "messages")  # also accepted by --columns
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages")
# A role name of each format → user/assistant/system
ROLES = {"sharegpt": {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                      "system": "system"},
         "messages": {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}}
TURN_KEYS = {"sharegpt": ("conversations", "from", "value"), "messages": ("messages", "role", "content")}
# Optional labels that an evaluation set may carry (data/exam): kept as they are, read by medlora.eval's scores.
META_FIELDS = ("kind", "chapter", "disease", "attribute", "layout", "safe_action", "harmful", "triage", "entries", "acceptable",
               "asks")
NEWLINE = b"\n"
CJK = re.compile("[\u3000-\u9fff\uff00-\uffef]")
CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)  # csv's default is 128 KiB per field; a long answer is still a record


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """`instruction=问题,output=答案` → {"问题": "instruction", "答案": "output"} (source column → field)."""
    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, dict) else (p.split("=", 1) for p in spec.split(",") if p.strip())
    mapping = {}
    for pair in pairs:
        if len(pair) != 2 or pair[0].strip() not in (*FIELDS, *CONVERSATION_FIELDS):
            raise DataError(f"--columns: expected FIELD=COLUMN with FIELD one of "
                            f"{', '.join((*FIELDS, *CONVERSATION_FIELDS))}; got {spec!r}")
        field, column = pair[0].strip(), pair[1].strip()
        if column in mapping:
            raise DataError(f"--columns: column {column!r} is mapped twice ({mapping[column]} and {field}); map each "
                            f"column to one field")
        if field in mapping.values():
            raise DataError(f"--columns: field {field!r} is given two columns; give it one")
        mapping[column] = field
    return mapping


def load_records(source: str | Path, require_output: bool = True, columns: str | dict | None = None,
                 data_format: str = "auto", pairs: bool = False, hashes: dict | None = None) -> list[dict]:
    """Every record of `source`, validated, as `{"instruction", "input", "output"}` dicts (with `history` and
    `system` when a conversation has them). `pairs`: preference pairs (`pair_record`), `output` being the chosen
    answer and `rejected` the other. `hashes`, when given, gets {file: sha256 of the bytes read} for each file read
    (the provenance an adapter records: what was trained on, even if the file changes or goes later)."""
    records = list(iter_records(source, require_output=require_output, columns=columns, data_format=data_format,
                                pairs=pairs, hashes=hashes))
    if not records:
        raise DataError(f"{source}: no records found")
    return records


def iter_records(source: str | Path, require_output: bool = True, columns: str | dict | None = None,
                 data_format: str = "auto", pairs: bool = False, hashes: dict | None = None) -> Iterator[dict]:
    """Stream validated records; large JSONL files are read line by line, never whole."""
    if data_format not in DATA_FORMATS:
        raise DataError(f"--data_format {data_format!r}: use one of {', '.join(DATA_FORMATS)}")
    mapping = parse_columns(columns)
    path = Path(source)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        files = [p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if len(files) < len(found):
            logger.warning("%s: skipping %d hidden file(s) (names or folders starting with '.'), e.g. %s", path,
                           len(found) - len(files), next(p for p in found if p not in files).relative_to(path))
        if not files:
            raise DataError(f"{path}: no data files ({', '.join(SUFFIXES)}) in this folder")
        for file in files:
            yield from _iter_file(file, require_output, mapping, data_format, pairs, hashes)
    elif path.is_file():
        yield from _iter_file(path, require_output, mapping, data_format, pairs, hashes)
    elif path.exists():
        raise DataError(f"{source}: not a regular file or folder (a FIFO, device or socket cannot be read as data)")
    elif path.is_symlink():
        raise DataError(f"{source}: a symbolic link that leads nowhere (a loop, or its target is missing)")
    elif path.suffix.lower() in SUFFIXES or "/" in str(source) and not _looks_like_hub_name(str(source)):
        raise DataError(f"{source}: no such file or folder")
    else:
        yield from _iter_hub_dataset(str(source), require_output, mapping, data_format, pairs)


def _looks_like_hub_name(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/"))


def _iter_file(path: Path, require_output: bool, mapping: dict, data_format: str = "auto",
               pairs: bool = False, hashes: dict | None = None) -> Iterator[dict]:
    digest = hashlib.sha256() if hashes is not None else None  # only when provenance is asked for
    fmt = None if data_format == "auto" else data_format
    for where, row in read_rows(path, digest):
        if pairs:
            yield pair_record(row, f"{path}: {where}")
            continue
        fmt = fmt or detect_format(row, mapping)
        yield validate_record(row, f"{path}: {where}", require_output, mapping, fmt)
    if hashes is not None:  # every byte was read (and hashed as it was read)
        hashes[str(path)] = digest.hexdigest()


def read_rows(path: Path, digest=None) -> Iterator[tuple[str, object]]:
    """(where, row) for every row of one data file as it is written, unchecked beyond the file's own syntax: JSONL
    (`line 3`), a JSON array (`record 3`), CSV with a header row (`line 3`) or parquet (`row 3`); each byte goes
    into `digest` (a hashlib object) as it is read. Bad files are one-line DataErrors naming the file and line."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty (0 bytes)")
        if suffix == ".parquet":
            yield from _read_parquet(path, digest)
        elif suffix == ".csv":
            yield from _read_csv(path, digest)
        elif suffix == ".json" and _first_char(path) == "[":
            yield from _read_json_array(path, digest)
        else:
            yield from _read_jsonl(path, digest)
    except OSError as exc:  # unreadable (permissions, a vanished network mount): still the user's to fix
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def detect_format(row, mapping: dict | None = None) -> str:
    """The format of a record by its keys (after --columns renaming): sharegpt, messages or alpaca."""
    if isinstance(row, dict):
        keys = {(mapping or {}).get(key, key) for key in row}
        for fmt, (key, _, _) in TURN_KEYS.items():
            if key in keys and "instruction" not in keys:
                return fmt
    return "alpaca"


def validate_record(row, where: str, require_output: bool = True, mapping: dict | None = None,
                    data_format: str = "alpaca") -> dict:
    """Check one raw record and return it normalised; `where` says where it came from, for the message."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {'null' if row is None else type(row).__name__}")
    if mapping:
        optional = {"input", "history", "system", *(() if require_output else ("output",))}
        for column, name in mapping.items():
            needed = name in FIELDS or name in TURN_KEYS.get(data_format, ())
            if column not in row and name not in optional and needed:
                raise DataError(f"{where}: column '{column}' is missing (--columns {name}={column})")
        renamed = {key: value for key, value in row.items() if key not in mapping.values()}  # mapped columns win
        renamed.update({name: row[column] for column, name in mapping.items() if column in row})
        row = renamed
    if data_format in TURN_KEYS:
        both = [key for key, _, _ in TURN_KEYS.values() if key in row]
        if len(both) > 1:
            raise DataError(f"{where}: the record has both {' and '.join(map(repr, both))}; keep one conversation")
        row = {**row, **conversation_fields(row, where, data_format, require_output)}
    record = {}
    for name in FIELDS:
        value = row.get(name)
        optional = name == "input" or (name == "output" and not require_output)
        if value is None:
            if not optional:
                state = "is null" if name in row else "is missing"
                raise DataError(f"{where}: field '{name}' {state}")
            value = ""
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        if not value.isascii():
            check_encodable(value, f"{where}: field '{name}'")
        if name != "input" and not optional and not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")
        record[name] = value
    history = _history(row.get("history"), where)
    if history:
        record["history"] = history
    for name in ("system", *META_FIELDS):
        if row.get(name) is not None:
            if not isinstance(row[name], str):
                raise DataError(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}")
            if not row[name].isascii():
                check_encodable(row[name], f"{where}: field '{name}'")
            if row[name] or name != "system":
                record[name] = row[name]
    return record


def conversation_fields(row: dict, where: str, data_format: str, require_output: bool = True) -> dict:
    """A ShareGPT/messages conversation as alpaca fields: instruction (the last user turn), output (the
    assistant's answer to it; "" when it has none and none is required), history and system. The turns are those
    `medlora serve` makes of the same messages (turns.conversation_turns: one role's consecutive messages are one
    turn, system messages the system text)."""
    key, role_key, text_key = TURN_KEYS[data_format]
    roles = ROLES[data_format]
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        state = "is missing" if key not in row else "must be a non-empty list of turns"
        raise DataError(f"{where}: field '{key}' {state} ({data_format} format)")
    messages = []
    for number, turn in enumerate(turns, start=1):
        at = f"{where}: turn {number}"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: a turn must be an object with '{role_key}' and '{text_key}'")
        role = turn.get(role_key)
        if not isinstance(role, str):  # a list or an object cannot even be looked up among the roles
            raise DataError(f"{at}: field '{role_key}' must be a string (one of {', '.join(roles)}), got "
                            f"{'null' if role is None else type(role).__name__}")
        if role not in roles:
            raise DataError(f"{at}: unknown role {role[:40]!r} in '{role_key}' (known: {', '.join(roles)})")
        messages.append((roles[role], turn_text(turn.get(text_key), at, text_key)))
    try:
        system, texts = conversation_turns(messages)  # the server's rule for a request's messages too
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    if len(texts) % 2:  # it ends with a user turn
        if require_output:
            raise DataError(f"{where}: turn {len(turns)}: the last turn is the user's, not the assistant's (nothing "
                            f"to learn from it)")
        texts.append("")
    fields = {"instruction": texts[-2], "input": "", "output": texts[-1],
              "history": [list(pair) for pair in zip(texts[0:-2:2], texts[1:-2:2])]}
    if system or row.get("system") is not None:
        fields["system"] = system or row.get("system")
    return fields


def joined_text_parts(parts: list, where: str) -> str:
    """OpenAI's content parts (`[{"type": "text", "text": ...}, ...]`) as one text, joined by a newline: the one rule
    for data files and `medlora serve`'s requests. A part that is not text (an image, audio) is a DataError."""
    for number, part in enumerate(parts, start=1):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DataError(f"{where} part {number}: only text parts ({{\"type\": \"text\", \"text\": ...}}) can "
                            f"be read, got type {str(kind)[:40]!r}")
    return "\n".join(part["text"] for part in parts)


def turn_text(content, at: str, text_key: str, empty: str = "empty turn") -> str:
    """A turn's non-empty text: a string, or OpenAI's content parts (`[{"type": "text", "text": ...}, ...]`)
    joined by a newline, as `medlora serve` joins a request's; a part that is not text (an image, audio) is refused,
    since nothing could be trained on it. `empty` opens the message for a turn without text."""
    if isinstance(content, list):
        content = joined_text_parts(content, f"{at}: '{text_key}'")
    if not isinstance(content, str) or not content.strip():
        raise DataError(f"{at}: {empty} ('{text_key}' must be non-empty text)")
    if not content.isascii():
        check_encodable(content, f"{at}: '{text_key}'")
    return content


# --- preference pairs ------------------------------------------------------------------------------------------------

def pair_record(row, where: str) -> dict:
    """One preference pair as a record whose `output` is the chosen answer and `rejected` the other, from any of:
    TRL's `prompt`/`chosen`/`rejected` (text, or conversational: lists of role/content messages, the prompt
    explicit or shared by both conversations), LLaMA-Factory's (alpaca: instruction/input/chosen/rejected with
    optional system and history; sharegpt: `conversations` and `chosen`/`rejected` as from/value turns), and
    MedicalGPT's (system/history/question/response_chosen/response_rejected). Optional: `knowledge` (the facts
    the prompt is given, as text; "" for none) and `scores` (a judge's, kept as they are)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a pair must be a JSON object, got {'null' if row is None else type(row).__name__}")
    if "response_chosen" in row or "question" in row:  # MedicalGPT
        base = {"instruction": row.get("question"), "input": "", "output": _pair_text(row, "response_chosen", where),
                "history": row.get("history"), "system": row.get("system")}
        rejected, fmt = _pair_text(row, "response_rejected", where), "alpaca"
    elif isinstance(row.get("chosen"), list):  # TRL conversational
        chosen, rejected_turns = row["chosen"], row.get("rejected")
        if not isinstance(rejected_turns, list) or not rejected_turns:
            raise DataError(f"{where}: field 'rejected' must be a non-empty list of messages, like 'chosen'")
        prompt = row.get("prompt")
        if prompt is None:  # implicit prompt: two whole conversations that differ in their last turn only
            if chosen[:-1] != rejected_turns[:-1]:
                raise DataError(f"{where}: 'chosen' and 'rejected' must share every turn but the last (no 'prompt')")
            prompt, chosen, rejected_turns = chosen[:-1], chosen[-1:], rejected_turns[-1:]
        if not isinstance(prompt, list):
            raise DataError(f"{where}: field 'prompt' must be a list of messages when 'chosen' is one")
        base, fmt = {"messages": prompt + chosen[-1:], "system": row.get("system")}, "messages"
        rejected = _last_turn(rejected_turns, "rejected", "role", "content", where)
        _last_turn(chosen, "chosen", "role", "content", where)
    elif "conversations" in row:  # LLaMA-Factory sharegpt
        chosen, turns = row.get("chosen"), row["conversations"]
        base = {"conversations": turns + [chosen] if isinstance(turns, list) else turns, "system": row.get("system")}
        _last_turn([chosen], "chosen", "from", "value", where)
        rejected, fmt = _last_turn([row.get("rejected")], "rejected", "from", "value", where), "sharegpt"
    elif "prompt" in row:  # TRL standard
        base = {"instruction": row.get("prompt"), "input": "", "output": _pair_text(row, "chosen", where),
                "system": row.get("system")}
        rejected, fmt = _pair_text(row, "rejected", where), "alpaca"
    else:  # LLaMA-Factory alpaca
        base = {key: row.get(key) for key in ("instruction", "input", "history", "system")}
        base["output"] = _pair_text(row, "chosen", where)
        rejected, fmt = _pair_text(row, "rejected", where), "alpaca"
    record = validate_record({k: v for k, v in base.items() if v is not None}, where, True, None, fmt)
    if record["output"].strip() == rejected.strip():
        raise DataError(f"{where}: the chosen and rejected answers are the same (nothing to prefer)")
    record["rejected"] = rejected
    knowledge = row.get("knowledge")
    if knowledge is not None:
        if not isinstance(knowledge, str):
            raise DataError(f"{where}: field 'knowledge' must be a string (the facts shown; \"\" for none)")
        check_encodable(knowledge, f"{where}: field 'knowledge'")
        record["knowledge"] = knowledge
    if isinstance(row.get("scores"), dict):
        record["scores"] = row["scores"]
    return record


def _pair_text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        state = "is missing" if key not in row else "must be non-empty text"
        raise DataError(f"{where}: field '{key}' {state}")
    check_encodable(value, f"{where}: field '{key}'")
    return value


def _last_turn(turns: list, key: str, role_key: str, text_key: str, where: str) -> str:
    """The text of an answer given as turns (TRL's messages, LLaMA-Factory's from/value): its last turn, the
    assistant's."""
    turn = turns[-1] if turns else None
    if not isinstance(turn, dict) or turn.get(role_key) not in ("assistant", "gpt"):
        raise DataError(f"{where}: field '{key}' must end with an assistant turn ({role_key}: assistant or gpt)")
    return turn_text(turn.get(text_key), f"{where}: field '{key}'", text_key, empty="empty answer")


def _history(value, where: str) -> list[list[str]]:
    """alpaca's `history`: [[user, assistant], ...] with non-empty text."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'history' must be a list of [user, assistant] pairs")
    for number, pair in enumerate(value, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{where}: history turn {number}: expected a [user, assistant] pair of strings")
        if not all(t.strip() for t in pair):
            raise DataError(f"{where}: history turn {number}: empty turn")
        for text in pair:
            if not text.isascii():
                check_encodable(text, f"{where}: history turn {number}")
    return [list(pair) for pair in value]


def check_encodable(value: str, where: str) -> None:
    """Refuse lone surrogates (a JSON `\\ud800` escape without its pair): not text, and tokenizers crash on them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: unpaired surrogate {value[exc.start]!r} at character {exc.start + 1} "
                        f"(a broken \\u escape; not valid text)") from None


def _decode(raw: bytes, path: Path, where: str | None = None) -> str:
    """UTF-8 text, or a DataError saying where it breaks and what the bytes look like; `where` defaults to the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.start
    where = where or f"line {raw.count(NEWLINE, 0, bad) + 1}"
    target = f"'{path.with_suffix('.utf8' + path.suffix)}'"
    replaced = raw.decode("utf-8", errors="replace")
    n_bad = replaced.count("\ufffd")
    # Chinese UTF-8 text with a broken spot decodes to many CJK characters around few bad bytes; GBK bytes read
    # as UTF-8 give mostly bad bytes and hardly any CJK
    n_cjk = len(CJK.findall(replaced))
    if n_cjk >= 2 and n_cjk >= 2 * n_bad:
        raise DataError(f"{path}: {where}: not valid UTF-8 (a broken character in UTF-8 text: the file is damaged "
                        f"or was cut off there)")
    try:
        raw.decode("gb18030")
    except UnicodeDecodeError:
        raise DataError(f"{path}: {where}: not valid UTF-8 (its encoding is unknown); convert it to UTF-8, e.g. with: "
                        f"iconv -f ENCODING -t UTF-8 '{path}' > {target}") from None
    raise DataError(f"{path}: {where}: not valid UTF-8 (it looks GBK/GB18030-encoded); convert it with: "
                    f"iconv -f GB18030 -t UTF-8 '{path}' > {target}")


def _invalid_json(path: Path, exc: Exception, line: int | None = None) -> DataError:
    """A DataError for text that json.loads refused; `line` is the JSONL line, else it is found from the error."""
    if isinstance(exc, RecursionError):
        return DataError(f"{path}: {f'line {line}: ' if line else ''}invalid JSON (nested too deeply to read)")
    if not isinstance(exc, json.JSONDecodeError):  # ValueError: an integer of thousands of digits
        return DataError(f"{path}: {f'line {line}: ' if line else ''}invalid JSON ({str(exc).split(':')[0]})")
    doc, pos = exc.doc, exc.pos
    window = doc[max(0, pos - 4096):pos]
    if doc[pos:pos + 1] in ("]", "}") and window.rstrip().endswith(","):
        pos -= len(window) - len(window.rstrip()) + 1  # point at the comma
        what = "trailing comma at column {column}; JSON allows none before '" + doc[exc.pos] + "'"
    elif exc.msg == "Extra data":
        what = ("Extra data at column {column}: a second JSON value after the first; use one JSON array, or one "
                "JSON object per line")
    elif doc.strip() in ("{", "["):
        what = (exc.msg + " at column {column}: a record spread over several lines; JSONL needs one whole object "
                "per line (or write one JSON array)")
    else:
        what = exc.msg + " at column {column}"
    line = line or doc.count("\n", 0, pos) + 1
    column = pos - doc.rfind("\n", 0, pos)
    return DataError(f"{path}: line {line}: invalid JSON ({what.format(column=column)})")


class _RepeatedKey(Exception):
    """A JSON object with the same key twice (json.loads would keep the last one silently)."""


def _no_repeated_keys(pairs: list[tuple]) -> dict:
    record = dict(pairs)
    if len(record) < len(pairs):
        seen = set()
        raise _RepeatedKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return record


def _first_char(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(4096)
    return head.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")[:1]


def _read_hashed(path: Path, digest=None) -> bytes:
    raw = path.read_bytes()
    if digest is not None:
        digest.update(raw)
    return raw


def _read_jsonl(path: Path, digest=None) -> Iterator[tuple[str, object]]:
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if digest is not None:
                digest.update(raw)
            line = _decode(raw, path, f"line {lineno}").lstrip("\ufeff").strip()
            if not line:
                continue
            try:
                row = json.loads(line, object_pairs_hook=_no_repeated_keys)
            except _RepeatedKey as exc:
                raise DataError(f"{path}: line {lineno}: key {exc.args[0]!r} appears twice in one record") from None
            except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
                raise _invalid_json(path, exc, lineno) from None
            yield f"line {lineno}", row


def _read_json_array(path: Path, digest=None) -> Iterator[tuple[str, object]]:
    text = _decode(_read_hashed(path, digest), path).lstrip("\ufeff")
    try:
        rows = json.loads(text, object_pairs_hook=_no_repeated_keys)
    except _RepeatedKey as exc:
        raise DataError(f"{path}: key {exc.args[0]!r} appears twice in one record") from None
    except (ValueError, RecursionError) as exc:
        raise _invalid_json(path, exc) from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of records or one JSON object per line")
    for index, row in enumerate(rows, start=1):
        yield f"record {index}", row


def _read_csv(path: Path, digest=None) -> Iterator[tuple[str, object]]:
    """Rows as {header: value}; a row with more or fewer values than the header has columns is an error."""
    text = _decode(_read_hashed(path, digest), path).lstrip("\ufeff")
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    # newline="": only \r and \n end a CSV line (str.splitlines would also split at \u2028, \x1c, ... inside values)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        repeated = sorted({name for name in header if name and header.count(name) > 1})
        if repeated:
            raise DataError(f"{path}: line 1: column {', '.join(map(repr, repeated))} appears more than once")
        line = reader.line_num + 1
        for cells in reader:
            where, line = f"line {line}", reader.line_num + 1
            if not cells:  # a blank line is not a record
                continue
            if len(cells) != len(header):
                raise DataError(f"{path}: {where}: {len(cells)} values for {len(header)} columns "
                                f"({', '.join(header)}); quote values that contain commas or line breaks")
            yield where, dict(zip(header, cells))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None


def _read_parquet(path: Path, digest=None) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(_read_hashed(path, digest)))
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"row {index}", row


def _iter_hub_dataset(name: str, require_output: bool, mapping: dict, data_format: str = "auto",
                      pairs: bool = False) -> Iterator[dict]:
    import datasets

    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as exc:  # offline, unknown name, or a broken cache: all the same to the user
        raise DataError(
            f"{name}: not a file or folder, and datasets.load_dataset could not load it "
            f"(no network here: only locally cached datasets work): {type(exc).__name__}"
        ) from None
    fmt = None if data_format == "auto" else data_format
    for index, row in enumerate(rows, start=1):
        if pairs:
            yield pair_record(row, f"{name}: row {index}")
            continue
        fmt = fmt or detect_format(row, mapping)
        yield validate_record(row, f"{name}: row {index}", require_output, mapping, fmt)


def split_records(records: list[dict], val_set_size: float | int, seed: int = 42) -> tuple[list[dict], list[dict]]:
    """Hold out `val_set_size` records (a count, or a fraction when below 1) with a fixed seed."""
    n_val = int(round(val_set_size * len(records))) if 0 < val_set_size < 1 else int(val_set_size)
    if n_val < 0 or n_val >= len(records):
        raise DataError(
            f"--val_set_size {val_set_size} leaves no training records out of {len(records)}; use a smaller value"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val
