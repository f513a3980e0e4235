"""End to end: the seed's scripts fine-tune the tiny model until it reproduces its records, then infer."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import LEARN_FLAGS, REPO, SHARED_DATA, TINY_RECORDS


def run_script(script, *args):
    proc = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_finetune_then_infer_reproduces_the_records(tiny_model, tiny_records_file, tmp_path):
    out, res = tmp_path / "out", tmp_path / "res"
    train = run_script("finetune.py", "--base_model", tiny_model, "--data_path", str(tiny_records_file),
                       "--output_dir", str(out), "--num_epochs", "60", *LEARN_FLAGS)
    assert "adapter saved in" in train.stdout and "supervised tokens/s" in train.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "medlora.json", "tokenizer.json",
                 "loss_log.jsonl"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "medlora.json").read_text())
    assert meta["base_model"] == tiny_model and meta["template"]["name"] == "med_template"

    infer = run_script("infer.py", "--base_model", tiny_model, "--use_lora", "--lora_weights", str(out),
                       "--instruct_dir", str(tiny_records_file), "--model_output_dir", str(res),
                       "--max_new_tokens", "32")
    blocks = infer.stdout.split("###Instruction###\n")[1:]
    assert len(blocks) == len(TINY_RECORDS)
    for block, record in zip(blocks, TINY_RECORDS):
        golden = block.split("###golden output###\n")[1].split("\n###model output###\n")[0]
        answer = block.split("###model output###\n")[1].strip()
        assert golden == record["output"]
        assert answer == record["output"]  # learned by heart, stopped by EOS, no special token leaked
    rows = [json.loads(line) for line in (res / "results.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == [r["output"] for r in TINY_RECORDS]
    assert all(r["ended_by_eos"] for r in rows)


@pytest.mark.skipif(not (SHARED_DATA / "huatuo").exists(), reason="../shared/data/huatuo is absent")
def test_seed_commands_on_huatuo_files(tiny_model, tmp_path):
    """The README's first example: the seed's flags, Huatuo's template and inference file."""
    huatuo = SHARED_DATA / "huatuo"
    out, res = tmp_path / "out", tmp_path / "res"
    run_script("finetune.py", "--base_model", tiny_model, "--data_path", str(huatuo / "infer.json"),
               "--prompt_template", str(huatuo / "med_template.json"), "--output_dir", str(out),
               "--num_epochs", "1", "--batch_size", "4", "--micro_batch_size", "2")
    infer = run_script("infer.py", "--base_model", tiny_model, "--use_lora", "--lora_weights", str(out),
                       "--instruct_dir", str(huatuo / "infer.json"), "--prompt_template",
                       str(huatuo / "med_template.json"), "--model_output_dir", str(res), "--max_new_tokens", "8")
    assert infer.stdout.count("###Instruction###") == 5
    assert infer.stdout.count("###golden output###") == 5 and infer.stdout.count("###model output###") == 5
    assert len((res / "results.jsonl").read_text().splitlines()) == 5


def test_reloaded_adapter_gives_the_in_memory_logits(tiny_model, tiny_records_file, tmp_path):
    from medlora.config import DataArgs, LoraArgs, ModelArgs, TrainArgs
    from medlora.modeling import load_adapter, load_base_model, load_tokenizer
    from medlora.train import finetune, save_adapter

    captured = {}
    import medlora.train as train_module

    original = train_module.save_adapter

    def capture(model, tokenizer, out_dir, meta, save_bin=False):
        captured["model"] = model
        return original(model, tokenizer, out_dir, meta, save_bin)

    train_module.save_adapter = capture
    try:
        finetune(ModelArgs(base_model=tiny_model, dtype="fp32"),
                 DataArgs(data_path=str(tiny_records_file)),
                 LoraArgs(lora_target_modules="all-linear", lora_dropout=0.0),
                 TrainArgs(output_dir=str(tmp_path / "a"), num_epochs=2, batch_size=8, micro_batch_size=4,
                           report_to="none", save_bin=True), echo=lambda *a: None)
    finally:
        train_module.save_adapter = save_adapter
    assert (tmp_path / "a" / "adapter_model.bin").is_file()  # --save_bin: the seed's file too
    tokenizer = load_tokenizer(tiny_model)
    batch = tokenizer([r["instruction"] for r in TINY_RECORDS], return_tensors="pt", padding=True)
    in_memory = captured["model"].eval()
    reloaded = load_adapter(load_base_model(tiny_model, dtype="fp32"), tmp_path / "a").eval()
    batch = batch.to(reloaded.device)
    with torch.no_grad():
        expected, actual = in_memory(**batch).logits, reloaded(**batch).logits
    assert torch.allclose(expected, actual, atol=1e-5)
    assert not torch.allclose(actual, load_base_model(tiny_model, dtype="fp32")(**batch).logits, atol=1e-3)


def test_the_cli_log_shows_medlora_progress_but_not_other_libraries_chatter():
    """A fresh machine's first report printed matplotlib's `generated new fontManager` as if it were ours."""
    code = ("import logging; from medlora.cli import setup_logging; setup_logging(); "
            "logging.getLogger('matplotlib.font_manager').info('generated new fontManager'); "
            "logging.getLogger('httpx').info('HTTP Request: GET /'); "
            "logging.getLogger('medlora.train').info('ours'); logging.getLogger('peft').warning('theirs, a warning')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["[medlora] ours", "[medlora] theirs, a warning"]
