"""A gemma3-270m cache folder (in $MEDLORA_HOME) with the real config and tokenizer but random weights, for a GPU
machine that cannot fetch the 245 MB GGUF. Same shapes, so speed and memory are the real model's; losses and answers
are not. Argument: a folder holding config.json, generation_config.json, tokenizer_config.json, tokenizer.json.gz
(copied from a prepared cache: `~/.cache/medlora/models/gemma3-270m`)."""

import gzip
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from medlora.io import write_manifest
from medlora.registry import READY_MARKER, model_dir

src, dst = Path(sys.argv[1]), model_dir("gemma3-270m")
dst.mkdir(parents=True, exist_ok=True)
start = time.time()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.bfloat16)
model.save_pretrained(dst)
for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
    shutil.copy(src / name, dst / name)
with gzip.open(src / "tokenizer.json.gz", "rb") as packed, open(dst / "tokenizer.json", "wb") as out:
    shutil.copyfileobj(packed, out)
write_manifest(dst, READY_MARKER, name="gemma3-270m", source="random weights, real config (GPU check)",
               random_weights=True)
print(f"random-weight gemma3-270m in {dst}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
      f"{time.time() - start:.0f} s", flush=True)
