"""Crash-safe training on real training processes: kill -9 and resume, SIGTERM, corrupted checkpoints, NaN guard.

Each run is tiny-qwen2 on the 8 TINY_RECORDS: batch 4 of micro-batches of 2 (so the data order matters), fp32,
LoRA dropout 0, a fixed seed. Resuming restores weights, optimizer, scheduler, data position and RNG states, so
a resumed run must end with the uninterrupted run's adapter; the two are compared to 1e-6 (on this machine they
are bit-identical).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, run_medlora
from medlora.errors import ConfigError
from medlora.io import write_manifest
from medlora.resilience import COMPLETE_MARKER, EXIT_INTERRUPTED, find_resume_checkpoint, is_complete_checkpoint

STEPS = 8
RUN_FLAGS = ["--max_steps", str(STEPS), "--save_steps", "2", "--save_total_limit", "3", "--batch_size", "4",
             "--micro_batch_size", "2", "--learning_rate", "1e-2", "--warmup_steps", "0", "--logging_steps", "1",
             "--lora_target_modules", "all-linear", "--lora_dropout", "0", "--dtype", "fp32", "--seed", "7",
             "--report_to", "none"]


def finetune_args(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--base_model", model, "--data_path", str(data), "--output_dir", str(out), *RUN_FLAGS, *extra]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medlora.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended (exit {proc.returncode}) before {path} appeared\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"adapters differ by {worst}"


def logged_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text(encoding="utf-8").splitlines()]
    return [row["step"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tiny_records_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_medlora(*finetune_args(tiny_model, tiny_records_file, out))
    return out


@pytest.mark.slow  # ~20 s: make test-slow
def test_kill_9_then_resume_gives_the_uninterrupted_adapter(uninterrupted, tiny_model, tiny_records_file, tmp_path):
    out = tmp_path / "run"
    args = finetune_args(tiny_model, tiny_records_file, out)
    proc = start(args)
    wait_for(out / "checkpoint-4" / COMPLETE_MARKER, proc)  # the 2nd checkpoint is complete
    assert proc.poll() is None, "training finished before it could be killed"
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()

    resumed = run_medlora(*args, "--resume_from_checkpoint", "auto")
    assert f"resuming from {out / 'checkpoint-'}" in resumed.stdout
    assert_same_adapter(uninterrupted, out)
    assert logged_steps(out) == list(range(1, STEPS + 1))  # the steps redone after the checkpoint are logged once
    assert is_complete_checkpoint(out / f"checkpoint-{STEPS}")


def test_corrupted_newest_checkpoint_is_skipped(uninterrupted, tiny_model, tiny_records_file, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    (out / "adapter_model.safetensors").unlink()
    newest = out / f"checkpoint-{STEPS}" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a save cut short

    resumed = run_medlora(*finetune_args(tiny_model, tiny_records_file, out), "--resume_from_checkpoint", "auto")
    assert f"warning: skipping incomplete checkpoint {out / f'checkpoint-{STEPS}'}" in resumed.stdout
    assert f"resuming from {out / f'checkpoint-{STEPS - 2}'}" in resumed.stdout
    assert_same_adapter(uninterrupted, out)
    assert is_complete_checkpoint(out / f"checkpoint-{STEPS}")  # written again, and marked again
    assert logged_steps(out) == list(range(1, STEPS + 1))


def test_sigterm_saves_a_checkpoint_and_exits_75(tiny_model, tiny_records_file, tmp_path):
    out = tmp_path / "run"
    proc = start(finetune_args(tiny_model, tiny_records_file, out, "--max_steps", "500", "--save_steps", "1000"))
    wait_for(out / "loss_log.jsonl", proc)  # the first step is done: the handler is installed
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "stopped on request" in stdout and "--resume_from_checkpoint auto" in stdout
    checkpoints = [p for p in out.glob("checkpoint-*") if is_complete_checkpoint(p)]
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) < 500
    assert not (out / "adapter_model.safetensors").exists()  # interrupted: no final adapter


@pytest.mark.slow  # ~10 s: make test-slow
def test_nan_guard_stops_a_diverging_run(tiny_model, tiny_records_file, tmp_path):
    # fp32 RMSNorm saturates instead of overflowing at moderate rates (1e6 leaves a flat loss of ln V);
    # 1e38 pushes the LoRA weights past float32's range after one step, so the next loss is NaN.
    out = tmp_path / "run"
    proc = run_medlora(*finetune_args(tiny_model, tiny_records_file, out, "--learning_rate", "1e38",
                                      "--lora_target_modules", "q_proj,v_proj", "--max_steps", "4"), check=False)
    assert proc.returncode == 1, proc.stderr
    error = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "diverged" in error[0] and "at step 2" in error[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "adapter_model.safetensors").exists()


# --- find_resume_checkpoint on hand-made folders ---------------------------------------------------------------

def fake_checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    save_file({"lora_A": torch.zeros(2, 4)}, str(folder / "adapter_model.safetensors"))
    if complete:
        write_manifest(folder, COMPLETE_MARKER, step=step)
    return folder


def test_auto_picks_the_newest_complete_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 2)
    wanted = fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-x").mkdir()
    messages = []
    assert find_resume_checkpoint(str(tmp_path), "auto", messages.append) == str(wanted)
    assert any("skipping incomplete checkpoint" in m and "checkpoint-12" in m for m in messages)


def test_auto_without_checkpoints_starts_from_scratch(tmp_path):
    messages = []
    assert find_resume_checkpoint(str(tmp_path), "auto", messages.append) is None
    assert "starting from scratch" in messages[-1]


def test_explicit_and_empty_resume(tmp_path):
    folder = fake_checkpoint(tmp_path, 4)
    assert find_resume_checkpoint(str(tmp_path), str(folder)) == str(folder)
    assert find_resume_checkpoint(str(tmp_path), "") is None
    with pytest.raises(ConfigError, match="no such checkpoint"):
        find_resume_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-99"))


def test_a_changed_file_breaks_the_marker(tmp_path):
    folder = fake_checkpoint(tmp_path, 4)
    assert is_complete_checkpoint(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 10)
    assert not is_complete_checkpoint(folder)


def test_a_damaged_checkpoint_of_the_right_size_is_skipped_by_auto_and_named_when_asked_for(tmp_path):
    older = fake_checkpoint(tmp_path, 4)
    newest = fake_checkpoint(tmp_path, 8)
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # same size: the marker still vouches for it
    write_manifest(newest, COMPLETE_MARKER, step=8)
    messages = []
    assert find_resume_checkpoint(str(tmp_path), "auto", messages.append) == str(older)
    assert any(m.startswith(f"[medlora] warning: skipping damaged checkpoint {newest}: {weights}: not a readable "
                            f"safetensors file") for m in messages), messages
    with pytest.raises(ConfigError) as caught:
        find_resume_checkpoint(str(tmp_path), str(newest))
    assert str(caught.value).startswith(f"--resume_from_checkpoint {newest}: {weights}: not a readable safetensors")


@pytest.mark.parametrize("name, value", [("MEDLORA_THREADS", "abc"), ("MEDLORA_THREADS", "0"), ("MEDLORA_THREADS", "-1"),
                                         ("MEDLORA_THREADS", "1.5"), ("MEDLORA_THREADS", "99999"),
                                         ("WORLD_SIZE", "0"), ("WORLD_SIZE", "x"), ("RANK", "-3"),
                                         ("LOCAL_WORLD_SIZE", "two"), ("MEDLORA_HOME", ""), ("MEDLORA_HOME", "/dev/null")])
def test_every_environment_variable_is_checked_in_one_line(monkeypatch, capsys, name, value):
    """Read through medlora.io.env_int / env_folder: a bad value is one line naming the variable (it was a
    traceback, a division by zero, a segfault at 99999 threads, or a silent ./models)."""
    from medlora.cli import main
    from medlora.train import is_main_process, world_size

    monkeypatch.setenv(name, value)
    if name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        from medlora.errors import ConfigError
        from medlora.train import check_gpus_per_process

        with pytest.raises(ConfigError, match=rf"^\${name}"):
            {"WORLD_SIZE": world_size, "RANK": is_main_process, "LOCAL_WORLD_SIZE": check_gpus_per_process}[name]()
        return
    assert main(["models"] if name == "MEDLORA_HOME" else ["infer", "--base_model", "no/such"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"medlora {'models' if name == 'MEDLORA_HOME' else 'infer'}: error: ${name}")


def test_an_adapter_of_nans_is_refused_not_saved(tiny_model, tiny_records_file, tmp_path, capsys):
    """--learning_rate 1e308 once saved an adapter of NaNs with exit 0; --num_epochs inf overflowed after loading."""
    from medlora.cli import main

    out = tmp_path / "nan"
    assert main(["finetune", "--base_model", tiny_model, "--data_path", str(tiny_records_file), "--output_dir", str(out),
                 "--max_steps", "2", "--learning_rate", "1e308", "--fast_loss", "false", "--dtype", "fp32",
                 "--batch_size", "4", "--micro_batch_size", "4"]) != 0
    assert "not finite" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (out / "adapter_model.safetensors").exists()
    assert main(["finetune", "--base_model", tiny_model, "--data_path", str(tiny_records_file), "--num_epochs", "inf",
                 "--output_dir", str(tmp_path / "inf")]) == 2


def test_a_medlora_home_where_nothing_can_be_written_is_one_line(monkeypatch, capsys, tiny_records_file):
    from medlora.cli import main

    monkeypatch.setenv("MEDLORA_HOME", "/proc/medlora-home")  # no folder can be made there, even by root
    assert main(["infer", "--base_model", "tiny-qwen2", "--instruct_dir", str(tiny_records_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medlora infer: error: $MEDLORA_HOME /proc/medlora-home: cannot prepare the built-in "
                              "model 'tiny-qwen2' there"), err
