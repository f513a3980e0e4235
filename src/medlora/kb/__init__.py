"""The curated knowledge base (`src/medlora/kb/ch*.yaml`, schema in `kb/SCHEMA.md`): loading and validation, and
the sources a data build can draw on (the curated base, CMeKG, or both)."""

from __future__ import annotations

from pathlib import Path

import yaml

from medlora.errors import DataError
from medlora.vocab import CHAPTERS, normalise

KB_DIR = Path(__file__).parent
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader when libyaml is there (same result)

STRING_FIELDS = ("name", "icd10_chapter", "department")
REQUIRED_LISTS = ("causes", "symptoms", "examinations", "treatments")
OPTIONAL_LISTS = ("transmission", "drugs", "complications", "prevention", "high_risk_groups", "aliases")
KNOWN_KEYS = set(STRING_FIELDS) | set(REQUIRED_LISTS) | set(OPTIONAL_LISTS)
LINKING_FIELDS = ("name", "aliases")  # the words a question is linked to an entry by


def check_entry_text(entry: dict, where: str) -> None:
    """What the strings of a knowledge entry must be, whichever file gave it (the curated YAML, a user's JSONL or
    YAML): text, and linking words that keep a letter once normalised. A lone surrogate (JSON's or YAML's `\\ud800`
    without its pair) loads and trains, then fails the adapter's save; a name or alias of punctuation only normalises
    to "" and would link every question to the entry. `entry` maps a field to a string or a list of strings."""
    from medlora.data import check_encodable  # the data records' rule for the same broken text

    for key, value in entry.items():
        for text in [value] if isinstance(value, str) else value:
            if not text.isascii():
                check_encodable(text, f"{where}: field {key!r}")
    for key in LINKING_FIELDS:
        value = entry.get(key, [])
        for text in [value] if isinstance(value, str) else value:
            if not normalise(text):
                raise DataError(f"{where}: field {key!r}: {text[:40]!r} is only punctuation and spaces, which would "
                                f"match every question; give a word")


# ----------------------------------------------------------------------------------------------- loading


def _kb_files(kb_dir: str | Path | None) -> list[Path]:
    path = Path(kb_dir) if kb_dir is not None else KB_DIR
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: knowledge-base folder not found")
    files = sorted(path.glob("ch*.yaml"), key=lambda p: p.name)
    if not files:
        raise DataError(f"{path}: no ch*.yaml knowledge-base files found")
    return files


def _is_string_list(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(item, str) and item.strip() for item in value))


def _validate(entry, index: int, fname: str) -> dict:
    if not isinstance(entry, dict):
        raise DataError(f"{fname}: disease #{index}: must be a mapping of fields, got {type(entry).__name__}")
    name = entry.get("name")
    # a name that cannot be shown on one line (a lone surrogate, a line break) is named by its number
    shown = isinstance(name, str) and name.strip() and name.isprintable()
    label = f"disease '{name}'" if shown else f"disease #{index}"
    where = f"{fname}: {label}"
    for key in entry:
        if key not in KNOWN_KEYS:
            raise DataError(f"{where}: field '{key}' is not a known field ({', '.join(sorted(KNOWN_KEYS))})")
    for key in STRING_FIELDS:
        if key not in entry:
            raise DataError(f"{where}: field '{key}' is required")
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise DataError(f"{where}: field '{key}' must be a non-empty string")
    if entry["icd10_chapter"].strip() not in CHAPTERS:
        raise DataError(f"{where}: field 'icd10_chapter' must be one of the chapter names in SCHEMA.md, "
                        f"got {entry['icd10_chapter']!r}")
    for key in REQUIRED_LISTS:
        if key not in entry:
            raise DataError(f"{where}: field '{key}' is required")
    for key in (*REQUIRED_LISTS, *OPTIONAL_LISTS):
        if key in entry and not _is_string_list(entry[key]):
            raise DataError(f"{where}: field '{key}' must be a non-empty list of strings")
    check_entry_text(entry, where)
    disease = {key: entry[key].strip() for key in STRING_FIELDS}
    for key in (*REQUIRED_LISTS, *OPTIONAL_LISTS):
        if key in entry:
            disease[key] = [item.strip() for item in entry[key]]
    return disease


def load_knowledge_base(kb_dir: str | Path | None = None) -> list[dict]:
    """Every disease of every `ch*.yaml` in `kb_dir` (files sorted by name), validated; raises DataError."""
    diseases: list[dict] = []
    seen: dict[str, str] = {}
    for path in _kb_files(kb_dir):
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DataError(f"{path.name}: cannot read the file: {exc}".splitlines()[0]) from exc
        if not isinstance(data, list) or not data:
            raise DataError(f"{path.name}: must be a non-empty YAML list of diseases")
        for index, entry in enumerate(data, 1):
            disease = _validate(entry, index, path.name)
            name = disease["name"]
            if name in seen:
                raise DataError(f"{path.name}: disease '{name}': field 'name' duplicates a disease of {seen[name]}")
            seen[name] = path.name
            diseases.append(disease)
    return diseases


def red_flags() -> list[dict]:
    """kb/red_flags.yaml: the clinical red flags that make a question an emergency (`flag`, the `words` patients
    use for it, and the public triage guidance it is taken from), the one list the triage data is checked against."""
    return yaml.load((KB_DIR / "red_flags.yaml").read_text(encoding="utf-8"), Loader=_YAML_LOADER)


SOURCES = ("kb", "cmekg", "both")


def load_sources(source: str = "kb", kb_dir: str | Path | None = None) -> list[dict]:
    """The diseases a build draws on, each with its `source` (`kb` or `cmekg`): the curated knowledge base, CMeKG
    (cleaned by medlora.cmekg; needs the `cmekg` extra), or both, where on a name or alias conflict the curated
    entry wins whole."""
    if source not in SOURCES:
        raise DataError(f"--source {source!r}: choose one of {', '.join(SOURCES)}")
    curated = [{**d, "source": "kb"} for d in load_knowledge_base(kb_dir)] if source != "cmekg" else []
    if source == "kb":
        return curated
    from medlora import cmekg

    return cmekg.merge(curated, cmekg.load_diseases()) if curated else cmekg.load_diseases()
