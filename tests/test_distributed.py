"""Data parallelism: two gloo processes under torchrun train the adapter that one process trains, and only rank 0
writes. Also: the DeepSpeed configs, the sharding guard, and the vLLM chat template given in docs/distributed.md.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_medlora
from medlora.cli import main
from medlora.errors import ConfigError
from medlora.resilience import COMPLETE_MARKER, is_complete_checkpoint
from medlora.train import gradient_accumulation

WORLD = 2
STEPS = 3
# Why the two runs can be compared weight for weight: the global batch (8) is the whole dataset (the 8
# TINY_RECORDS), so every optimizer step is one epoch and its gradient is the mean over all 8 examples, whatever
# order the single-process RandomSampler or the per-rank DistributedSampler pick. The math is identical; only
# the summation order differs (1 process accumulates 2 micro-batches, 2 processes all-reduce one each) and the
# padding of each micro-batch, so weights may differ in the last float32 bits: tolerance 1e-5 (bit-identical here).
FLAGS = ["--max_steps", str(STEPS), "--batch_size", "8", "--micro_batch_size", "4", "--learning_rate", "1e-2",
         "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "2", "--lora_target_modules", "all-linear",
         "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--dtype", "fp32", "--group_by_length", "false",
         "--seed", "11", "--report_to", "none"]
ATOL = 1e-5
# gloo on CPU unless there is a GPU per process (two ranks on one GPU are refused: see the test below); the
# single-process run compares on the same device.
CPU_UNLESS_ENOUGH_GPUS = {} if torch.cuda.device_count() >= WORLD else {"CUDA_VISIBLE_DEVICES": ""}


def finetune_args(model: str, data: Path, out: Path) -> list[str]:
    return ["finetune", "--base_model", model, "--data_path", str(data), "--output_dir", str(out), *FLAGS]


@pytest.fixture(scope="module")
def single(tiny_model, tiny_records_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    run_medlora(*finetune_args(tiny_model, tiny_records_file, out), env=CPU_UNLESS_ENOUGH_GPUS)
    return out


@pytest.fixture(scope="module")
def ddp(tiny_model, tiny_records_file, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp") / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "-m", "medlora.cli", *finetune_args(tiny_model, tiny_records_file, out)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **CPU_UNLESS_ENOUGH_GPUS})
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return out, proc


def loss_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text(encoding="utf-8").splitlines()]
    return [row for row in rows if "loss" in row]


@pytest.mark.slow  # two training processes under torchrun (~35 s): make test-slow
def test_two_processes_train_the_single_process_adapter(single, ddp):
    out, _ = ddp
    one, two = load_file(single / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert one.keys() == two.keys() and one
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= ATOL, f"adapters differ by {worst}"
    assert any(v.abs().max() > 0 for k, v in two.items() if "lora_B" in k)  # it trained (B starts at zero)
    # the logged loss is the global batch's in both runs
    assert [r["step"] for r in loss_rows(out)] == [r["step"] for r in loss_rows(single)] == list(range(1, STEPS + 1))
    for a, b in zip(loss_rows(single), loss_rows(out)):
        assert a["loss"] == pytest.approx(b["loss"], abs=ATOL)


@pytest.mark.slow  # two training processes under torchrun (~35 s): make test-slow
def test_only_rank_0_writes_and_speaks(ddp):
    out, proc = ddp
    assert proc.stdout.count("adapter saved in") == 1
    assert proc.stdout.count("records tokenised") == 1
    assert "[transformers]" not in proc.stderr  # the other rank's library warnings are silenced too
    rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text(encoding="utf-8").splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps))  # one row per step, not one per rank
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind
    assert len(list(out.glob("adapter_model.safetensors"))) == 1 and (out / "medlora.json").is_file()
    meta = json.loads((out / "medlora.json").read_text())
    assert meta["train_args"]["batch_size"] == 8


@pytest.mark.slow  # two training processes under torchrun (~35 s): make test-slow
def test_checkpoint_marker_lists_every_ranks_files(ddp):
    out, _ = ddp
    checkpoint = out / "checkpoint-2"
    assert is_complete_checkpoint(checkpoint)
    listed = json.loads((checkpoint / COMPLETE_MARKER).read_text())["files"]
    assert {f"rng_state_{rank}.pth" for rank in range(WORLD)} <= listed.keys()


def test_global_batch_is_independent_of_the_process_count():
    assert [gradient_accumulation(128, 4, n) for n in (1, 2, 4, 8)] == [32, 16, 8, 4]
    assert gradient_accumulation(128, 8, 16) == 1
    with pytest.raises(ConfigError, match="multiple of --micro_batch_size 4 × 3 process"):
        gradient_accumulation(8, 4, 3)


# --- DeepSpeed / FSDP -------------------------------------------------------------------------------------------

def auto_keys(node, prefix: str = "") -> set[str]:
    if isinstance(node, dict):
        return set().union(*(auto_keys(v, f"{prefix}{k}.") for k, v in node.items())) if node else set()
    return {prefix[:-1]} if node == "auto" else set()


@pytest.mark.parametrize("name, stage", [("ds_zero2.json", 2), ("ds_zero3.json", 3)])
def test_deepspeed_configs_follow_the_trainer(name, stage):
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config = json.loads((REPO / "configs" / name).read_text())
    assert config["zero_optimization"]["stage"] == stage
    # every "auto" must be a key the installed Trainer fills in (else DeepSpeed would see the string "auto")
    filled = set(re.findall(r"fill_(?:match|only)\(\s*\"([^\"]+)\"", inspect.getsource(HfTrainerDeepSpeedConfig)))
    assert auto_keys(config) and auto_keys(config) <= filled, auto_keys(config) - filled
    assert {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "optimizer.params.lr", "bf16.enabled", "scheduler.params.total_num_steps"} <= auto_keys(config)
    assert config["scheduler"]["params"]["warmup_type"] == "linear"  # DeepSpeed's default is log; Trainer's linear
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard is for machines without CUDA")
@pytest.mark.parametrize("flags", [["--fsdp", "full_shard auto_wrap"], ["--deepspeed", "configs/ds_zero2.json"]])
def test_sharding_options_are_refused_without_cuda(tiny_model, tiny_records_file, tmp_path, capsys, flags):
    out = tmp_path / "run"
    assert main([*finetune_args(tiny_model, tiny_records_file, out), *flags]) == 2
    err = capsys.readouterr().err
    assert "--deepspeed/--fsdp need CUDA" in err and "Traceback" not in err
    assert not out.exists()


def test_more_processes_than_gpus_is_refused_before_loading(tiny_model, tiny_records_file, tmp_path, capsys,
                                                            monkeypatch):
    # Seen on a one-GPU machine: two torchrun ranks failed in DDP's set-up with NCCL's "Duplicate GPU detected".
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("medlora.train.load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "run"
    assert main(finetune_args(tiny_model, tiny_records_file, out)) == 2
    err = capsys.readouterr().err
    assert "2 processes" in err and "1 CUDA GPU" in err and "--nproc_per_node 1" in err and "Traceback" not in err
    assert not out.exists()


# --- serving on vLLM: the chat template of docs/distributed.md --------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "感冒的常见症状是什么？"}],
    [{"role": "system", "content": "你是一名医生。"}, {"role": "user", "content": "高血压应该去哪个科室？"}],
    [{"role": "system", "content": "A"}, {"role": "developer", "content": "B"}, {"role": "user", "content": "q1"},
     {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
    [{"role": "user", "content": "q1"}, {"role": "user", "content": "q1b"}, {"role": "assistant", "content": "a1"},
     {"role": "assistant", "content": "a1b"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
     {"role": "user", "content": "q3"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_vllm_chat_template_builds_medlora_serve_prompt(tiny_model, messages):
    api = pytest.importorskip("medlora.serve.engine")
    from medlora.modeling import load_tokenizer
    from medlora.templates import load_template

    doc = (REPO / "docs" / "distributed.md").read_text(encoding="utf-8")
    chat_template = re.search(r"```jinja\n(.*?)```", doc, re.S).group(1)
    tokenizer = load_tokenizer(tiny_model)
    system, last_user, history = api.split_conversation(messages)
    template = load_template("med_template")
    assert chat_template == template.chat_jinja()  # the docs show what the code generates
    expected = template.build_prompt(last_user, "", tokenizer, history, system=system)
    rendered = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == expected
