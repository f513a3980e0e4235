"""Fold a LoRA adapter into its base and save a plain transformers model folder.

The folder (safetensors weights, config, generation config, tokenizer, medlora.json) loads with
`AutoModelForCausalLM.from_pretrained` alone, and works as `--base_model DIR` in every medlora command: its
medlora.json carries the adapter's template. It is built in a temporary folder beside the target, checked
(the saved model's logits against the adapter model's), and only then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medlora import __version__
from medlora.config import ModelArgs, PromptArgs
from medlora.errors import ModelError
from medlora.io import atomic_write_text, check_output_folder, remove_stale_staging, staging_prefix
from medlora.loader import load
from medlora.modeling import (MEDLORA_META, default_device, read_adapter_meta, recorded_decoding, resolve_dtype,
                              resolve_model_path)

# Largest max-abs logit difference accepted between the saved merged model and base + adapter. Both are run in
# float64 for the check, so it measures what merging changed (the rounding of W + BA to the saved dtype), not the
# rounding noise of fp32/bf16 matmuls, which alone reaches ~1e-4 on a small model with a strong adapter. bf16
# keeps 8 mantissa bits: its tolerance is relative to the largest logit (tiny-qwen2 + the test adapter: 3.4%);
# a dropped or mis-scaled adapter moves logits by far more.
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-1}
RELATIVE_TOLERANCE = {"fp32": False, "bf16": True}
MERGE_DTYPES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
CHECK_QUESTIONS = [
    ("感冒的常见症状是什么？", ""),
    ("高血压患者日常饮食需要注意什么？", ""),
    ("哮喘发作时首选什么药物？", "患者为成人。"),
]


@dataclass
class MergeReport:
    out_dir: Path
    dtype: str
    max_abs_diff: float
    tolerance: float
    n_prompts: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        verdict = "match" if self.ok else "DO NOT MATCH"
        return (f"merged model saved in {self.out_dir} ({self.dtype}, {self.seconds:.1f} s); logits {verdict} the "
                f"adapter model's on {self.n_prompts} prompts: max abs diff {self.max_abs_diff:.2e} "
                f"(tolerance {self.tolerance:.1e}; computed in float64)")


def merge_adapter(base_model: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "fp32",
                  trust_remote_code: bool = False, allow_pickle: bool = False) -> MergeReport:
    """Write base + adapter as one model in `out_dir`; raise ModelError (leaving `out_dir` as it was) on failure."""
    started = time.perf_counter()
    dtype = _merge_dtype(dtype)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, base_model, adapter_dir)
    # The reference is the adapter model as it runs in `dtype`; merging in float64 leaves one rounding: the cast
    # of W + BA to `dtype`. The adapter's own knowledge is not needed to merge it.
    margs = ModelArgs(base_model, dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    loaded = load(margs, {"adapter": str(adapter_dir)}, PromptArgs(knowledge="none"), merge=False,
                  padding_side="right")
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.templates["adapter"]
    model.eval().double()
    prompts = [template.build_prompt(q, i, tokenizer) for q, i in CHECK_QUESTIONS]
    add_special = template.add_special_tokens
    expected = _logits(model, tokenizer, prompts, add_special)
    merged = model.merge_and_unload().to(resolve_dtype(dtype))
    meta = {"medlora_version": __version__, "template": template.to_dict(), "system": template.system,
            "merged_from": {"base_model": base_model, "adapter": str(adapter_dir)}, "dtype": dtype}
    knowledge = read_adapter_meta(adapter_dir).get("knowledge")
    if knowledge:  # the merged model is prompted with the facts it was trained with, as the adapter was
        meta["knowledge"] = knowledge
    decoding = recorded_decoding(adapter_dir)
    if decoding:  # and answers with the decoding it was made for (its generation_config.json is the base's)
        meta["decoding"] = decoding

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir.parent, f".{out_dir.name}.merging-")  # left by a merge that was killed
    if out_dir.exists():  # else a killed swap's .old- folder holds the last complete model: keep it
        remove_stale_staging(out_dir.parent, f".{out_dir.name}.old-")
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(f".{out_dir.name}.merging-"), dir=out_dir.parent))
    try:
        save_merged(merged, tokenizer, staging, meta)
        del model, merged  # the check below reloads from disk: keep one copy of the weights in memory
        diff = _max_abs_diff(expected, _logits(_load_plain(staging, dtype).double(), tokenizer, prompts, add_special))
        tolerance = TOLERANCE[dtype] * (_max_abs(expected) if RELATIVE_TOLERANCE[dtype] else 1.0)
        report = MergeReport(out_dir, dtype, diff, tolerance, len(prompts), 0.0)
        if not report.ok:
            raise ModelError(f"the merged model's logits differ from the adapter model's by {diff:.2e} "
                             f"(tolerance {report.tolerance:.1e}); nothing was written to {out_dir}")
        _swap_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.perf_counter() - started
    return report


def save_merged(model, tokenizer, folder: Path, meta: dict) -> None:
    """Weights (safetensors), config, generation config, tokenizer, then medlora.json."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    write_meta(folder, meta)


def write_meta(folder: Path, meta: dict) -> None:
    atomic_write_text(folder / MEDLORA_META, json.dumps(meta, ensure_ascii=False, indent=2))


def _merge_dtype(name: str) -> str:
    if name not in MERGE_DTYPES:
        raise ModelError(f"--dtype {name!r}: merge writes fp32 or bf16 weights")
    return MERGE_DTYPES[name]


def _check_out_dir(out_dir: Path, base_model: str, adapter_dir: str | Path) -> None:
    """Refuse targets whose replacement would destroy something that is not an earlier merged model."""
    target = out_dir.resolve()
    for source in (resolve_model_path(base_model), adapter_dir):
        if Path(source).exists() and target in (Path(source).resolve(), *Path(source).resolve().parents):
            raise ModelError(f"--out {out_dir}: would overwrite the model or adapter being merged; "
                             f"choose another folder")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ModelError(f"--out {out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ModelError(f"--out {out_dir}: a non-empty folder that is not a saved model; refusing to replace it")
    check_output_folder("--out", out_dir.parent)  # the merged folder is made beside it, then renamed


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished folder to `out_dir`; an existing `out_dir` is moved aside first, then removed."""
    for path in staging.iterdir():  # mkdtemp/mkstemp (here and in the savers) make owner-only files
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
    os.chmod(staging, 0o777 & ~_umask())
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=staging_prefix(f".{out_dir.name}.old-"), dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(staging, out_dir)
    except OSError:
        os.replace(old / out_dir.name, out_dir)  # put the previous model back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _load_plain(folder: Path, dtype: str):
    """The saved folder as any transformers user would load it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype))
    return model.to(default_device()).eval()


@torch.inference_mode()
def _logits(model, tokenizer, prompts: list[str], add_special_tokens: bool) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:  # one at a time: no padding to line up between the two models
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(device)
        out.append(model(**ids).logits.cpu())
    return out


def _max_abs(logits: list[torch.Tensor]) -> float:
    return max(t.abs().max().item() for t in logits)


def _max_abs_diff(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    return max((e - a).abs().max().item() for e, a in zip(expected, actual))
