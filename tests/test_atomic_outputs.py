"""kill -9 while outputs are written: afterwards each output is the complete old version, the complete new one, or
absent (refused as incomplete) — never a mixture that loads.

The real writers are used: `medlora.train.save_adapter`, `medlora.export.merge_adapter`,
`medlora.io.atomic_write_jsonl` and `medlora.eval.report.write_report`. A worker process (this file run as a script)
writes two versions A and B of each output as references, then, round after round, forks a child that writes the
other version and SIGKILLs it:

- at every filesystem step of the write (the child kills itself just before its k-th `os.replace`/`os.unlink`),
- after a delay drawn from a seeded RNG (which lands inside file writes, model loading, the merge check, ...).

After each kill the output is compared by content hash with the references. Rounds print as JSON lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KINDS = ("adapter", "merge", "results", "report")
DELAY_KILLS = {"adapter": 4, "merge": 1, "results": 5, "report": 4}


# --- a quick adapter (also used by test_bad_inputs and test_server_abuse) ------------------------------------

def lora_on_tiny_qwen2(r: int = 4):
    """tiny-qwen2 (fp32) with a LoRA adapter on q_proj and v_proj, and its tokenizer."""
    from medlora.modeling import attach_lora, load_base_model, load_tokenizer

    model = attach_lora(load_base_model("tiny-qwen2", "fp32", device="cpu"), r=r, alpha=2 * r, dropout=0.0,
                        target_modules="q_proj,v_proj")
    return model, load_tokenizer("tiny-qwen2")


def save_quick_adapter(model, tokenizer, out_dir: Path, seed: int, extra: dict | None = None) -> Path:
    """Give the LoRA B matrices seeded non-zero values (so the adapter changes answers) and save it as finetune does."""
    import torch

    from medlora.modeling import model_fingerprint
    from medlora.templates import load_template
    from medlora.train import save_adapter

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    base = model.get_base_model()
    meta = {"base_model": "tiny-qwen2", "base_fingerprint": model_fingerprint(base.config),
            "template": load_template("med_template").to_dict(), "seed": seed, **(extra or {})}
    return save_adapter(model, tokenizer, out_dir, meta)


def quick_adapter(out_dir: Path, seed: int = 0) -> Path:
    model, tokenizer = lora_on_tiny_qwen2()
    return save_quick_adapter(model, tokenizer, Path(out_dir), seed)


# --- the writers: each returns write(variant, out_dir) -----------------------------------------------------------

def adapter_writer(work: Path):
    model, tokenizer = lora_on_tiny_qwen2()
    return lambda variant, out: save_quick_adapter(model, tokenizer, out, seed=ord(variant), extra={"v": variant})


def merge_writer(work: Path):
    from medlora.export import merge_adapter

    adapters = {variant: quick_adapter(work / f"adapter-{variant}", seed=ord(variant)) for variant in "AB"}
    return lambda variant, out: merge_adapter("tiny-qwen2", adapters[variant], out, "fp32")


def _rows(variant: str, n: int = 3000) -> list[dict]:
    return [{"instruction": f"问题 {i}", "input": "", "golden": f"答案 {i}", "output": f"{variant} 回答 {i} " * 8,
             "tokens": i} for i in range(n)]


def results_writer(work: Path):
    from medlora.io import atomic_write_jsonl

    return lambda variant, out: atomic_write_jsonl(out / "results.jsonl", _rows(variant))


def report_writer(work: Path):
    from medlora.eval.report import write_report

    train_dir = work / "train"
    train_dir.mkdir()
    (train_dir / "loss_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 / s}) + "\n"
                                                      for s in range(1, 40)))

    def write(variant, out):
        metrics = {"base": {"rouge_l": 0.1}, variant: {"rouge_l": 0.5 if variant == "A" else 0.6}}
        rows = {"base": _rows("base", 300), variant: _rows(variant, 300)}
        write_report(out, metrics, rows, train_dir, subtitle=f"version {variant}")
    return write


WRITERS = {"adapter": adapter_writer, "merge": merge_writer, "results": results_writer, "report": report_writer}
FILES = {"results": ("results.jsonl",), "report": ("report.md", "report.html", "loss_curve.png")}


# --- judging an output folder ------------------------------------------------------------------------------------

def fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every file, hidden staging leftovers (names starting with '.') excepted."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def judge(kind: str, out: Path, refs: dict[str, dict]) -> str:
    """'A', 'B', 'absent', per-file labels for multi-file outputs, or a label starting with 'CORRUPT'."""
    state = fingerprint(out)
    if kind in FILES:
        labels = []
        for name in FILES[kind]:
            found = [v for v, ref in refs.items() if state.get(name) == ref[name]]
            labels.append(f"{name}:{found[0] if found else 'absent' if name not in state else 'CORRUPT'}")
        return " ".join(labels) if "CORRUPT" not in " ".join(labels) else "CORRUPT " + " ".join(labels)
    for variant, ref in refs.items():
        if state == ref:
            return variant
    if kind == "merge":
        return "absent" if not out.exists() else f"CORRUPT {sorted(state)}"
    from medlora.errors import ModelError
    from medlora.modeling import check_adapter_dir

    try:
        check_adapter_dir(out)
    except ModelError:
        return "absent"  # no adapter_config.json: refused as an unfinished adapter folder
    return f"CORRUPT {sorted(state)}"


def check_reference(kind: str, folder: Path) -> None:
    """A reference version is itself complete and loadable."""
    from safetensors.torch import load_file

    if kind == "adapter":
        from medlora.modeling import check_adapter_dir

        check_adapter_dir(folder)
        assert load_file(folder / "adapter_model.safetensors")
    elif kind == "merge":
        assert json.loads((folder / "config.json").read_text()) and load_file(folder / "model.safetensors")
    elif kind == "results":
        assert all(json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines())
    else:
        assert (folder / "report.html").read_text().rstrip().endswith("</html>")


# --- the worker --------------------------------------------------------------------------------------------------

class KillAtStep:
    """Patch os.replace and os.unlink to SIGKILL this process just before the k-th call (k=0: only count)."""

    def __init__(self, k: int = 0):
        self.k, self.calls, self.saved, self.names = k, 0, {}, []

    def __enter__(self):
        for name in ("replace", "unlink"):
            original = self.saved[name] = getattr(os, name)
            setattr(os, name, self._wrap(name, original))
        return self

    def _wrap(self, name, original):
        def step(*args, **kwargs):
            self.calls += 1
            self.names.append(name)
            if self.calls == self.k:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return step

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(os, name, original)


def run_child(body, kill_after: float | None = None, timeout: float = 120.0) -> tuple[bool, bool]:
    """Fork; the child runs `body`. SIGKILL it after `kill_after` s (or `timeout`). Returns (killed, timed_out)."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    deadline = time.monotonic() + (timeout if kill_after is None else kill_after)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return True, kill_after is None
        time.sleep(0.002)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, False


def worker(kind: str, work: Path, seed: int) -> None:
    import torch

    torch.set_num_threads(1)  # no OpenMP pool in the parent: fork-safe
    write = WRITERS[kind](work)
    out, refs = work / "out", {}
    write("A", out)
    check_reference(kind, out)
    refs["A"] = fingerprint(out)
    with KillAtStep() as counter:  # counts the steps of a write that replaces a complete version
        started = time.perf_counter()
        write("B", out)
        duration = time.perf_counter() - started
    check_reference(kind, out)
    refs["B"] = fingerprint(out)
    assert refs["A"] != refs["B"]
    # every rename is a kill point, and so is the last removal (of old files, once the new version is in place)
    unlinks = [k for k, name in enumerate(counter.names, 1) if name == "unlink"]
    steps = sorted({k for k, name in enumerate(counter.names, 1) if name == "replace"} | set(unlinks[-1:]))
    rng = random.Random(seed)
    plan = [("step", k) for k in steps] + [("delay", round(rng.uniform(0.0, 1.5 * duration), 3))
                                           for _ in range(DELAY_KILLS[kind])]
    print(json.dumps({"kind": kind, "steps_per_write": counter.names, "write_seconds": round(duration, 3)}),
          flush=True)
    for mode, at in plan:
        clear_leftovers(work, out)  # so that each child's k-th step is the k-th step of its own write
        before = judge(kind, out, refs)
        new = "B" if before.split(" ")[0] in ("A", f"{FILES.get(kind, ('',))[0]}:A") else "A"
        if mode == "step":
            def body(k=at, variant=new):
                with KillAtStep(k):
                    write(variant, out)
            killed, hung = run_child(body)
        else:
            def body(variant=new):
                while True:
                    write(variant, out)
                    variant = "B" if variant == "A" else "A"
            killed, hung = run_child(body, kill_after=at)
        after = judge(kind, out, refs)
        print(json.dumps({"kind": kind, "mode": mode, "at": at, "killed": killed, "hung": hung, "before": before,
                          "after": after, "leftovers": leftovers(work, out)}), flush=True)
    write("A", out)  # a run that finishes clears what the killed ones left
    print(json.dumps({"kind": kind, "final": judge(kind, out, refs), "leftovers": leftovers(work, out)}), flush=True)


def clear_leftovers(work: Path, out: Path) -> None:
    from medlora.io import remove_stale_staging

    remove_stale_staging(out, ".adapter-")
    for kind in (".out.merging-", ".out.old-"):
        remove_stale_staging(work, kind)


def leftovers(work: Path, out: Path) -> list[str]:
    """Hidden temporary files and folders in the output folder and beside it."""
    return sorted(p.name for p in work.rglob(".*") if p.parent in (work, out))


# --- the tests ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kill_rounds(tiny_model, tmp_path_factory) -> dict[str, list[dict]]:
    """Every round of every kind: one worker process per kind, all started at once."""
    # CPU only: the children are forked, and a forked child cannot use CUDA that its parent set up (seen on a GPU
    # machine: every child died before its first write). What is tested is the files, not the device.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    procs = {kind: subprocess.Popen([sys.executable, __file__, kind, str(tmp_path_factory.mktemp(f"kill-{kind}")), "8"],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for kind in KINDS}
    rounds = {}
    for kind, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        rounds[kind] = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return rounds


@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_leaves_the_old_version_the_new_one_or_nothing(kill_rounds, kind):
    header, *rounds, final = kill_rounds[kind]
    print(f"{kind}: {len(rounds)} kills; states after them: {sorted({r['after'] for r in rounds})}")
    assert len([r for r in rounds if r["mode"] == "delay"]) == DELAY_KILLS[kind]
    corrupt = [r for r in rounds if "CORRUPT" in r["after"]]
    assert not corrupt, json.dumps(corrupt, ensure_ascii=False, indent=1)
    assert not any(r["hung"] for r in rounds)
    assert all(r["killed"] for r in rounds if r["mode"] == "delay")
    assert any(r["killed"] for r in rounds if r["mode"] == "step")
    assert final["final"].split(" ")[0] in ("A", f"{FILES.get(kind, ('',))[0]}:A")
    if kind in ("adapter", "merge"):  # their staging folders name their process: a later write removes them
        assert final["leftovers"] == [], final


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
