"""`medlora merge`: the merged folder computes what base + adapter computed, and loads without medlora."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_RECORDS, run_medlora

QUESTION, ANSWER = TINY_RECORDS[0]["instruction"], TINY_RECORDS[0]["output"]


@pytest.fixture(scope="module")
def merged(tiny_model, tiny_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merge") / "merged"
    proc = run_medlora("merge", "--base_model", tiny_model, "--lora_weights", str(tiny_adapter), "--out", str(out))
    assert re.search(r"logits match the adapter model's on \d+ prompts: max abs diff", proc.stdout), proc.stdout
    return out


def test_folder_is_a_plain_transformers_model(merged, tiny_adapter):
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "medlora.json"} <= names
    assert not any(name.endswith((".bin", ".pt")) for name in names)
    meta = json.loads((merged / "medlora.json").read_text(encoding="utf-8"))
    assert meta["template"] == json.loads((tiny_adapter / "medlora.json").read_text(encoding="utf-8"))["template"]
    assert meta["merged_from"] == {"base_model": "tiny-qwen2", "adapter": str(tiny_adapter)}
    assert not [p for p in merged.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_the_merged_model_answers_with_the_adapters_decoding(merged, tiny_adapter):
    """merge copies the adapter's recommended decoding (its generation_config.json) into medlora.json; the commands
    read it for the merged folder as for the adapter, and a plain base's generation_config.json is not read."""
    from medlora.cli import build_parser
    from medlora.commands._common import generation_args
    from medlora.config import GenerationArgs

    saved = json.loads((tiny_adapter / "generation_config.json").read_text(encoding="utf-8"))
    assert json.loads((merged / "medlora.json").read_text(encoding="utf-8"))["decoding"] == saved
    parser = build_parser(only="infer")
    gen = generation_args(parser.parse_args(["infer", "--base_model", str(merged)]), None, str(merged))
    assert (gen.max_new_tokens, gen.frequency_penalty) == (saved["max_new_tokens"], saved["frequency_penalty"])
    from medlora.modeling import resolve_model_path

    base = resolve_model_path("tiny-qwen2")
    assert (Path(base) / "generation_config.json").is_file()
    assert generation_args(parser.parse_args(["infer"]), None, base) == GenerationArgs()


def test_merged_logits_equal_the_adapter_models(merged, tiny_model, tiny_adapter):
    from transformers import AutoModelForCausalLM

    from medlora.loader import template_for
    from medlora.modeling import load_adapter, load_base_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    prompts = [template_for(None, tiny_adapter).build_prompt(r["instruction"], r["input"]) for r in TINY_RECORDS[:3]]
    peft_model = load_adapter(load_base_model(tiny_model, "fp32", device="cpu"), tiny_adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert plain.dtype == torch.float32
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            # fp32 weights compared in exact arithmetic: fp32 matmul noise alone is ~1e-4 on this tiny model
            # with its high-learning-rate adapter, so the fp32 run gets a looser bound.
            exact = (peft_model.double()(**ids).logits - plain.double()(**ids).logits).abs().max().item()
            assert exact < 1e-4
            fp32 = (peft_model.float()(**ids).logits - plain.float()(**ids).logits).abs().max().item()
            assert fp32 < 1e-3


PLAIN_LOAD = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, question = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
prompt = json.load(open(f"{folder}/medlora.json", encoding="utf-8"))["template"]["prompt_no_input"]
ids = tokenizer(prompt.format(instruction=question), return_tensors="pt")
out = model.generate(**ids, max_new_tokens=24, do_sample=False)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
print("medlora imported:", "medlora" in sys.modules)
"""


def test_loads_with_transformers_alone_in_a_fresh_process(merged):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(merged), QUESTION], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(ANSWER), proc.stdout
    assert "medlora imported: False" in proc.stdout


def test_merged_folder_works_as_base_model(merged):
    from medlora.config import GenerationArgs
    from medlora.generate import Generator

    generator = Generator.load(str(merged), dtype="fp32")
    assert generator.template.name == "med_template"  # from the merged folder's medlora.json
    answer = generator.generate([generator.build_prompt(QUESTION)], GenerationArgs(max_new_tokens=24))[0]
    assert answer.text == ANSWER


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_a_failed_merge_leaves_no_half_written_folder(tiny_model, tiny_adapter, tmp_path, monkeypatch):
    import medlora.export as export

    def disk_full(folder, meta):  # fails after the weights and tokenizer are written
        assert (folder / "model.safetensors").is_file()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_meta", disk_full)
    out = tmp_path / "merged"
    with pytest.raises(OSError):
        export.merge_adapter(tiny_model, tiny_adapter, out)
    assert not out.exists() and not _leftovers(tmp_path)

    out.mkdir()  # an earlier merged model stays whole when its replacement fails
    (out / "config.json").write_text("{}")
    with pytest.raises(OSError):
        export.merge_adapter(tiny_model, tiny_adapter, out)
    assert [p.name for p in out.iterdir()] == ["config.json"] and not _leftovers(tmp_path)


def test_logits_that_do_not_match_are_an_error(tiny_model, tiny_adapter, tmp_path, monkeypatch):
    import medlora.export as export
    from medlora.errors import ModelError

    monkeypatch.setitem(export.TOLERANCE, "fp32", 0.0)
    with pytest.raises(ModelError, match="logits differ"):
        export.merge_adapter(tiny_model, tiny_adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not _leftovers(tmp_path)


def test_refuses_to_replace_what_is_not_a_merged_model(tiny_model, tiny_adapter, tmp_path):
    from medlora.errors import ModelError
    from medlora.export import merge_adapter

    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not a saved model"):
        merge_adapter(tiny_model, tiny_adapter, tmp_path)
    with pytest.raises(ModelError, match="would overwrite"):
        merge_adapter(tiny_model, tiny_adapter, tiny_adapter.parent)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
