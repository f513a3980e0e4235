"""Hashes of what a refactoring must leave unchanged (issue 37): the demo's training examples (input ids and labels, with
its knowledge and noise) and the prompts and retrieved facts of the exam and the test split. Run from the repository
with each tree's code first on the path and compare the lines: PYTHONPATH=OTHER/src .venv/bin/python bench/prompt_hashes.py
(needs runs/demo/adapter: `make demo`)."""
import hashlib
import json

from medlora.config import DataArgs
from medlora.data import load_records
from medlora.generate import Generator
from medlora.knowledge import KnowledgeIndex
from medlora.modeling import load_tokenizer
from medlora.train import prepare_datasets
from medlora.turns import Turn

def h(obj):
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]

data = DataArgs(data_path="data/medqa/train.jsonl", val_data_path="data/medqa/valid.jsonl", prompt_template="med_knowledge",
                knowledge="kb", knowledge_noise=0.3, cutoff_len=384)
tok = load_tokenizer("gemma3-270m")
_, train_ds, val_ds, _ = prepare_datasets(data, tok, 42, KnowledgeIndex.load("kb"))
print("train examples", len(train_ds), h([list(train_ds["input_ids"]), list(train_ds["labels"])]))
print("valid examples", len(val_ds), h([list(val_ds["input_ids"]), list(val_ds["labels"])]))
gen = Generator.load("gemma3-270m", "runs/demo/adapter")
for name in ("data/exam/exam.jsonl", "data/medqa/test.jsonl"):
    recs = load_records(name)
    out = [gen.prepare(Turn(r["instruction"], r.get("input", ""))) for r in recs]
    print(name, len(out), "prompts", h([p for p, _ in out]), "facts", h([f.to_dict() if f else None for _, f in out]))
