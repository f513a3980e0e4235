"""Assembling the splits: every (disease, pattern) pair gives one record and goes to one split by a seeded hash, so
the pairs of the test split never occur in train or valid. Training pairs of the varied patterns come in
TRAIN_WORDINGS wordings and multiple-choice pairs in MCQ_TRAIN_VARIANTS variants; training also gets the copy-step
drills, one drug → disease statement per drug, and the safety records. Same seed → byte-identical files."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from medlora.databuild import safety
from medlora.databuild.index import Index
from medlora.kb import load_sources
from medlora.databuild.mcq import MCQ_PATTERNS, lookup
from medlora.databuild.patterns import PATTERNS, VARIED, drug_use, reverse_drug_item
from medlora.errors import DataError
from medlora.io import atomic_write_jsonl

SPLITS = ("train", "valid", "test")
FIELDS = ("instruction", "input", "output", "source")
TEST_SHARE, VALID_SHARE, MCQ_TEST_SHARE, MIN_MCQ_TEST = 0.08, 0.04, 0.20, 60
SAFETY_TEST_SHARE, UNKNOWN_TEST_SHARE = 0.12, 0.2
TRAIN_WORDINGS = 2  # each training pair of a VARIED pattern in this many wordings
MCQ_TRAIN_VARIANTS = 2  # each training MCQ pair with other distractors, layout and answer letter
LOOKUP_DRILLS = 1  # training-only copy-step drills per disease
ALL_PATTERNS = {**PATTERNS, **MCQ_PATTERNS}
TRAIN_ONLY_PATTERNS = {"lookup": lookup}


def seeded_unit(seed: int, *parts: str) -> float:
    """A uniform number in [0, 1) from a SHA-256 of the seed and `parts` (stable across runs and machines)."""
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(u: float, test_share: float, valid_share: float = VALID_SHARE) -> str:
    return "test" if u < test_share else "valid" if u < test_share + valid_share else "train"


def _assign_splits(tagged: list[dict], seed: int) -> None:
    """Set `split` on each record: one split per (disease, pattern) pair; MCQ pairs get a larger test share."""
    for record in tagged:
        record["_u"] = seeded_unit(seed, "split", record["disease"], record["pattern"])
    mcq = sorted(r["_u"] for r in tagged if r["pattern"] in MCQ_PATTERNS)
    mcq_test = MCQ_TEST_SHARE
    if len(mcq) >= MIN_MCQ_TEST and sum(u < mcq_test for u in mcq) < MIN_MCQ_TEST:
        mcq_test = mcq[MIN_MCQ_TEST - 1] + 1e-12  # guarantee at least MIN_MCQ_TEST MCQs in test
    for record in tagged:
        record["split"] = split_of(record.pop("_u"), mcq_test if record["pattern"] in MCQ_PATTERNS else TEST_SHARE)


def _rng(seed: int, *parts) -> random.Random:
    return random.Random("\x1f".join(map(str, (seed, *parts))))


def build_tagged(diseases: list[dict], seed: int = 42) -> list[dict]:
    """Every record with its tags: {"disease", "pattern", "split", "source", "instruction", "input", "output"}.

    Order: diseases as given, patterns as in ALL_PATTERNS, then the training extras and the safety records. Each
    record's wording comes from its own seeded RNG, so a record does not change when other diseases are added
    (except for distractors and comparison partners).
    """
    ix = Index(diseases)
    tagged = []
    for disease in diseases:
        for pattern, build in ALL_PATTERNS.items():
            made = build(ix, disease, _rng(seed, disease["name"], pattern))
            if made is not None:
                tagged.append({"disease": disease["name"], "pattern": pattern, "source": disease.get("source", "kb"),
                               "instruction": made[0], "input": "", "output": made[1]})
    _assign_splits(tagged, seed)
    return (tagged + _train_variants(ix, diseases, tagged, seed) + _drills(ix, diseases, seed)
            + _drug_uses(ix, diseases, tagged, seed) + _indications(diseases, seed) + _safety(diseases, seed))


def _train_variants(ix, diseases: list[dict], tagged: list[dict], seed: int) -> list[dict]:
    """More wordings of the training pairs only (test pairs stay unseen): varied patterns drawn again, MCQs with
    other distractors, layout and answer letter."""
    by_name = {d["name"]: d for d in diseases}
    seen = {(r["instruction"], r["output"]) for r in tagged}
    extra = []
    for record in tagged:
        pattern = record["pattern"]
        if record["split"] != "train" or (pattern not in VARIED and pattern not in MCQ_PATTERNS):
            continue
        for k in range(1, MCQ_TRAIN_VARIANTS if pattern in MCQ_PATTERNS else TRAIN_WORDINGS):
            made = ALL_PATTERNS[pattern](ix, by_name[record["disease"]], _rng(seed, record["disease"], pattern, k))
            if made is not None and made not in seen:
                seen.add(made)
                extra.append({**record, "instruction": made[0], "output": made[1]})
    return extra


def _drills(ix, diseases: list[dict], seed: int) -> list[dict]:
    """LOOKUP_DRILLS records of each TRAIN_ONLY_PATTERNS pattern per disease, all in the training split."""
    drills = []
    for disease in diseases:
        for pattern, build in TRAIN_ONLY_PATTERNS.items():
            for k in range(LOOKUP_DRILLS):
                made = build(ix, disease, _rng(seed, disease["name"], pattern, k))
                if made is not None:
                    drills.append({"disease": disease["name"], "pattern": pattern, "split": "train",
                                   "source": disease.get("source", "kb"), "instruction": made[0], "input": "",
                                   "output": made[1]})
    return drills


def _drug_uses(ix, diseases: list[dict], tagged: list[dict], seed: int) -> list[dict]:
    """Training-only statements, one per drug: which diseases it treats (drug → disease, the direction the other
    records never state). A drug asked about by a valid or test `reverse_drug` record gets none, so those held-out
    pairs stay unseen."""
    by_name = {d["name"]: d for d in diseases}
    held_out = {reverse_drug_item(ix, by_name[r["disease"]]) for r in tagged
                if r["pattern"] == "reverse_drug" and r["split"] != "train"}
    records = []
    for drug in sorted({x for d in diseases for x in d.get("drugs", [])} - held_out):
        users = ix.users("drugs", drug)
        question, output = drug_use(drug, [o["name"] for o in users][:4], _rng(seed, "drug_uses", drug))
        records.append({"disease": users[0]["name"], "pattern": "drug_uses", "split": "train",
                        "source": users[0].get("source", "kb"), "instruction": question, "input": "",
                        "output": output})
    return records


def _indications(diseases: list[dict], seed: int) -> list[dict]:
    """With CMeKG among the sources: drug → disease statements from its 适应症 (indications) for the drugs no
    disease of the build lists, naming only diseases of the build (training only)."""
    if not any(d.get("source") == "cmekg" for d in diseases):
        return []
    from medlora.cmekg import drug_indications

    names = {d["name"] for d in diseases}
    listed = {x for d in diseases for x in d.get("drugs", [])}
    records = []
    for drug, targets in sorted(drug_indications().items()):
        targets = [t for t in targets if t in names]
        if drug in listed or not targets:
            continue
        question, output = drug_use(drug, targets[:4], _rng(seed, "indications", drug))
        records.append({"disease": targets[0], "pattern": "drug_indications", "split": "train", "source": "cmekg",
                        "instruction": question, "input": "", "output": output})
    return records


def _safety(diseases: list[dict], seed: int) -> list[dict]:
    """The hand-written safety pairs (TRAIN_COPIES[kind] copies of each training pair) and the unknown-disease
    records (two wordings per training name, one per held-out name)."""
    records = []
    for pair in safety.pairs():
        split = split_of(seeded_unit(seed, "safety", pair["key"]), SAFETY_TEST_SHARE, 0.0)
        record = {"disease": "", "pattern": pair["pattern"], "split": split, "source": "safety",
                  "instruction": pair["instruction"], "input": "", "output": pair["output"]}
        records += [record] * (safety.TRAIN_COPIES[pair["pattern"]] if split == "train" else 1)
    for name in safety.unknown_names(diseases):
        split = split_of(seeded_unit(seed, "unknown", name), UNKNOWN_TEST_SHARE, 0.0)
        for k in range(TRAIN_WORDINGS if split == "train" else 1):
            question, output = safety.unknown(name, _rng(seed, "unknown", name, k))
            records.append({"disease": "", "pattern": "unknown", "split": split, "source": "safety",
                            "instruction": question, "input": "", "output": output})
    return records


def build_records(diseases: list[dict], seed: int = 42) -> dict[str, list[dict]]:
    """{"train", "valid", "test"} → records with the keys of FIELDS (seeded order)."""
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for record in build_tagged(diseases, seed):
        splits[record["split"]].append({key: record[key] for key in FIELDS})
    for name, records in splits.items():
        random.Random(f"{seed}\x1fshuffle\x1f{name}").shuffle(records)
    return splits


def build_dataset(out_dir: str | Path, seed: int = 42, kb_dir: str | Path | None = None,
                  kb_path: str | Path | None = None, source: str = "kb") -> dict[str, int]:
    """Write train.jsonl, valid.jsonl and test.jsonl into `out_dir` (atomically); returns the record counts.

    `kb_path` is an alias of `kb_dir` (a folder of ch*.yaml files, or one such file); `source` is `kb`, `cmekg`
    or `both` (CMeKG needs the `cmekg` extra).
    """
    if kb_dir is not None and kb_path is not None and Path(kb_dir) != Path(kb_path):
        raise DataError(f"give the knowledge base once: kb_dir={kb_dir} and kb_path={kb_path} differ")
    splits = build_records(load_sources(source, kb_dir if kb_dir is not None else kb_path), seed=seed)
    out = Path(out_dir)
    for name in SPLITS:
        atomic_write_jsonl(out / f"{name}.jsonl", splits[name])
    return {name: len(splits[name]) for name in SPLITS}

