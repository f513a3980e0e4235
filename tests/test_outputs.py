"""Outputs, round three of the hostile probe (issue 38): one claim per output (a lock, not inside an input, no dangling
link), a full disk in one line with nothing half-written trusted, provenance of what was read, clean-up on SIGTERM."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import write_jsonl
from medlora.cli import main, terminate_as_interrupt
from medlora.errors import ConfigError, TrainingError
from medlora.io import claim_output, release_outputs

RECORDS = [{"instruction": "头痛怎么办", "input": "", "output": "多休息。"}]


def one_line_error(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err and len(err.splitlines()) == 1 and len(err) <= 300, err
    for word in words:
        assert word in err, err
    return err


def test_a_second_writer_of_the_same_output_is_refused_until_the_first_is_done(tmp_path, capsys):
    out = tmp_path / "data"
    claim_output("--out", out)
    try:
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            claim_output("--out", tmp_path / "x" / ".." / "data")  # the same folder by another spelling
        one_line_error(capsys, main(["data", "build", "--out", str(out)]), "--out", "another medlora process")
        assert not out.exists()  # refused before any work
    finally:
        release_outputs()
    claim_output("--out", out)  # free again once released
    release_outputs()


def test_a_claim_is_held_across_processes(tmp_path):
    """Another process (a second `medlora finetune` into the same folder) is refused while the claim is held."""
    out = tmp_path / "adapter"
    script = (f"from medlora.io import claim_output\nimport time\nclaim_output('--output_dir', {str(out)!r})\n"
              f"print('held', flush=True)\ntime.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            claim_output("--output_dir", out)
    finally:
        holder.kill()
        holder.wait()
    claim_output("--output_dir", out)  # a killed holder's lock dies with it
    release_outputs()


@pytest.mark.parametrize("command", ["infer", "finetune"])
def test_an_output_inside_an_input_folder_is_refused(tmp_path, capsys, command):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", RECORDS)
    argv = (["infer", "--base_model", "tiny-qwen2", "--instruct_dir", str(data), "--model_output_dir",
             str(data / "out")] if command == "infer"
            else ["finetune", "--base_model", "tiny-qwen2", "--data_path", str(data), "--output_dir", str(data / "out")])
    one_line_error(capsys, main(argv), "inside the input")
    assert sorted(p.name for p in data.iterdir()) == ["train.jsonl"]


def test_a_dangling_link_as_an_output_folder_is_refused_before_any_work(tmp_path, capsys):
    link = tmp_path / "results"
    link.symlink_to(tmp_path / "gone")
    one_line_error(capsys, main(["data", "build", "--out", str(link)]), "link", "does not exist")
    one_line_error(capsys, main(["data", "build", "--out", str(link / "sub")]), "link")


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import medlora.databuild

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "medqa" / "train.jsonl"))

    monkeypatch.setattr(medlora.databuild, "build_dataset", full)
    one_line_error(capsys, main(["data", "build", "--out", str(tmp_path / "medqa")]), "no space left",
                   "train.jsonl")


def test_a_checkpoint_cut_short_is_not_marked_complete(tmp_path):
    """A full disk can cut a file short without an error; the marker must not vouch for it, nor `auto` resume."""
    from medlora.resilience import COMPLETE_MARKER, CheckpointMarkerCallback, find_resume_checkpoint

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"vocab"')  # cut short
    args = SimpleNamespace(output_dir=str(tmp_path), device="cpu")
    state = SimpleNamespace(global_step=2, is_world_process_zero=True)
    with pytest.raises(TrainingError, match="tokenizer.json is cut short"):
        CheckpointMarkerCallback().on_save(args, state, None)
    assert not (folder / COMPLETE_MARKER).exists()
    assert find_resume_checkpoint(str(tmp_path), "auto", echo=lambda *_: None) is None
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    real = os.statvfs
    full = lambda path: SimpleNamespace(f_bavail=0, f_frsize=real(path).f_frsize)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "statvfs", full)  # a disk left full: a file may be cut short without any error
        with pytest.raises(TrainingError, match="no space is left on its disk"):
            CheckpointMarkerCallback().on_save(args, state, None)
    CheckpointMarkerCallback().on_save(args, state, None)
    assert find_resume_checkpoint(str(tmp_path), "auto", echo=lambda *_: None) == str(folder)


def test_the_recorded_hash_is_that_of_the_bytes_read(tmp_path):
    """Provenance: each file read, hashed as it was read (a file edited or removed afterwards changes nothing)."""
    from medlora.data import load_records

    folder = tmp_path / "data"
    folder.mkdir()
    first = write_jsonl(folder / "a.jsonl", RECORDS)
    second = folder / "b.json"
    second.write_text(json.dumps(RECORDS * 2, ensure_ascii=False), encoding="utf-8")
    expected = {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in (first, second)}
    hashes = {}
    assert len(load_records(folder, hashes=hashes)) == 3
    first.write_text("changed\n")
    second.unlink()
    assert hashes == expected


def test_sigterm_runs_the_clean_up_of_a_command(tmp_path):
    """The CLI turns SIGTERM into KeyboardInterrupt, so `finally` blocks (staging folders, children) run."""
    with pytest.raises(KeyboardInterrupt), terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_converter_dies_with_its_parent_and_leaves_no_file_outside_the_staging_folder(tmp_path, monkeypatch):
    from medlora import llamacpp

    script = ("import subprocess, sys, time\nfrom medlora.llamacpp import die_with_parent\n"
              "child = subprocess.Popen(['sleep', '60'], preexec_fn=die_with_parent)\n"
              "print(child.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no clean-up of its own runs
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)

    staging = tmp_path / "staging"
    staging.mkdir()
    seen = []

    def interrupted(cmd, **kwargs):
        seen.append(Path(cmd[cmd.index("--metadata_json") + 1]))
        assert seen[0].parent == staging and seen[0].is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(llamacpp, "converter_dir", lambda: tmp_path)
    monkeypatch.setattr(llamacpp.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llamacpp.convert(tmp_path, staging / "model.gguf", "f16", {"medlora.version": "x"}, "model")
    assert seen and not seen[0].exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
