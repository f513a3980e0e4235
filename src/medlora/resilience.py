"""Crash-safe training: checkpoint completeness markers, `--resume_from_checkpoint auto`, graceful stop.

Trainer writes a checkpoint folder file by file; a marker written after it finished tells a complete one from
a partial one (a run killed mid-save), so `auto` resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from medlora.errors import ConfigError, TrainingError
from medlora.io import manifest_ok, write_manifest

COMPLETE_MARKER = ".medlora-complete"
EXIT_INTERRUPTED = 75
FULL_DISK_MARGIN = 1 << 20  # bytes left on a disk below which a folder just written there is not trusted
PARSED_JSON_LIMIT = 1 << 20  # JSON files up to this size are parsed to check they are whole  # EX_TEMPFAIL: stopped on request, checkpoint saved, resume later


class CheckpointMarkerCallback(TrainerCallback):
    """Marks each checkpoint complete once Trainer has written all of it."""

    def on_step_end(self, args, state, control, **kwargs):
        # a resumed run may write this step's checkpoint again: its old marker must not vouch for mixed files
        if state.is_world_process_zero:
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE_MARKER).unlink(missing_ok=True)
        return control

    def on_save(self, args, state, control, **kwargs):
        _any_rank(False, args.device)  # a barrier: every rank has written its rng_state_<rank>.pth
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                check_written(folder, "checkpoint")
                write_manifest(folder, COMPLETE_MARKER, step=state.global_step)
        return control


class GracefulStopCallback(TrainerCallback):
    """On SIGTERM/SIGINT: save a checkpoint at the next step boundary and stop. A second signal stops at once."""

    def __init__(self):
        self.requested = None
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.requested is not None, args.device):  # all ranks stop (and save) at the same step
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True
        return control

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum

    @contextmanager
    def installed(self):
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for sig in previous:
                signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _any_rank(flag: bool, device) -> bool:
    """`flag` OR-ed over all processes (a collective: every rank calls it at the same point)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def is_complete_checkpoint(path: Path) -> bool:
    return manifest_ok(path, COMPLETE_MARKER) and (path / "trainer_state.json").is_file()


def find_resume_checkpoint(output_dir: str, spec: str, echo=print) -> str | None:
    """`''` → None; a folder → itself; `auto` → the newest complete checkpoint in `output_dir` (or None)."""
    if not spec:
        return None
    if spec != "auto":
        if not Path(spec).is_dir():
            raise ConfigError(f"--resume_from_checkpoint {spec}: no such checkpoint folder")
        damage = unreadable_weights(Path(spec))
        if damage:
            raise ConfigError(f"--resume_from_checkpoint {spec}: {damage}")
        return spec
    candidates = sorted((p for p in Path(output_dir).glob("checkpoint-*") if checkpoint_step(p) >= 0),
                        key=checkpoint_step, reverse=True)
    for path in candidates:
        if not is_complete_checkpoint(path):
            echo(f"[medlora] warning: skipping incomplete checkpoint {path} (interrupted while saving)")
            continue
        damage = unreadable_weights(path)
        if damage:
            echo(f"[medlora] warning: skipping damaged checkpoint {path}: {damage}")
            continue
        echo(f"[medlora] resuming from {path}")
        return str(path)
    echo(f"[medlora] no complete checkpoint in {output_dir}: starting from scratch")
    return None


def check_written(folder: Path, what: str) -> None:
    """Refuse to vouch for a folder just written on a disk left full, or whose small JSON files do not parse, or whose
    weights cannot be read: a full disk can cut a file short without an error (a writer that ignores the failure of
    its last flush), and a marker or a rename must not make that file trusted. (Large JSON files, a tokenizer's, are
    not parsed: 0.4 s each time; the free space tells of a full disk instead.)"""
    def refuse(reason: str):
        return TrainingError(f"the {what} in {folder} was not written completely ({reason}); it was not kept as "
                             f"complete")

    free = os.statvfs(folder)
    if free.f_bavail * free.f_frsize < FULL_DISK_MARGIN:
        raise refuse("no space is left on its disk")
    for path in sorted(folder.glob("*.json")):
        if path.stat().st_size > PARSED_JSON_LIMIT:
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise refuse(f"{path.name} is cut short: is the disk full?") from None
    damage = unreadable_weights(folder)
    if damage:
        raise refuse(f"{damage}: is the disk full?")


def unreadable_weights(checkpoint: Path) -> str | None:
    """Why a checkpoint's safetensors files cannot be read (a corrupt header, cut short), or None when they can."""
    from medlora.errors import ModelError
    from medlora.modeling import check_safetensors

    for file in sorted(checkpoint.glob("*.safetensors")):
        try:
            check_safetensors(file)
        except ModelError as exc:
            return str(exc)
    return None


def resume_epoch(checkpoint: str | None) -> float:
    if not checkpoint:
        return 0.0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return float(state.get("epoch") or 0.0)
