"""`medlora export --format gguf`: tiny-qwen2 + adapter through llama.cpp's converter, read back with the gguf
package; the Ollama Modelfile; bad inputs refused in one line before any work. (llama.cpp itself answering from
the file, on the demo adapter, is the slow test in test_llamacpp_agreement.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medlora.cli import main


@pytest.fixture(scope="module")
def exported(tiny_model, tiny_adapter, tmp_path_factory) -> Path:
    """tiny-qwen2 + the session's adapter exported by the CLI, with a relative --out (the converter runs elsewhere)."""
    folder = tmp_path_factory.mktemp("gguf")
    cwd = os.getcwd()
    os.chdir(folder.parent)
    try:
        code = main(["export", "--format", "gguf", "--base_model", tiny_model, "--lora_weights", str(tiny_adapter),
                     "--out", f"{folder.name}/med.gguf", "--outtype", "f16"])
    finally:
        os.chdir(cwd)
    assert code == 0
    return folder / "med.gguf"


class InMemoryNumpy:
    """numpy, except that memmap reads the whole file into memory: GGUFReader slices its data a few times per string
    (445k strings: Qwen's 151k tokens and 294k merges), and np.memmap's Python-level hook on every slice makes the
    read 2.4x slower (12 s of CPU against 5 s for this 27 MB file)."""

    def __getattr__(self, name):
        import numpy

        return getattr(numpy, name)

    @staticmethod
    def memmap(path, mode="r"):
        import numpy

        return numpy.fromfile(path, dtype=numpy.uint8)


def test_reads_back_with_the_template_in_its_metadata(exported, tiny_model, tiny_adapter, monkeypatch):
    import gguf.gguf_reader
    from gguf import GGMLQuantizationType, GGUFReader
    from safetensors import safe_open

    from medlora.loader import template_for
    from medlora.modeling import resolve_model_path

    monkeypatch.setattr(gguf.gguf_reader, "np", InMemoryNumpy())
    reader = GGUFReader(exported)
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    with safe_open(Path(resolve_model_path(tiny_model)) / "model.safetensors", "pt") as weights:
        assert len(reader.tensors) == len(list(weights.keys()))  # one GGUF tensor per weight (tied head: none)
    assert field("general.architecture") == "qwen2"
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {GGMLQuantizationType.F16}
    template = template_for(None, tiny_adapter)
    assert field("tokenizer.chat_template") == template.chat_jinja()
    recorded = json.loads((tiny_adapter / "medlora.json").read_text(encoding="utf-8"))["template"]
    assert json.loads(field("medlora.template")) == recorded
    assert json.loads(field("medlora.source")) == {"base_model": "tiny-qwen2", "adapter": str(tiny_adapter)}
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) > 150_000
    assert sorted(p.name for p in exported.parent.iterdir()) == ["med.Modelfile", "med.gguf"]  # no staging left


def test_modelfile_carries_template_stops_and_evaluation_parameters(exported):
    text = exported.with_suffix(".Modelfile").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "FROM ./med.gguf" in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.count("{{") == template.count("}}")
    assert '"以下是一个医学问题。请运用医学知识准确作答。\\n### 问题:\\n" }}{{- $user }}{{- "\\n### 回答:\\n"' in template
    assert '{{- "<|endoftext|>" }}' in template  # an answer in the history ends with EOS, as in training
    for line in ('PARAMETER stop "### 回答:"', 'PARAMETER stop "### 问题:"', "PARAMETER temperature 0",
                 "PARAMETER frequency_penalty 0.3", "PARAMETER repeat_penalty 1.0", "PARAMETER num_predict 128"):
        assert line in lines


def test_the_modelfile_answers_with_the_recorded_decoding():
    from medlora.export_templates import ollama_parameters

    sampled = ollama_parameters({"max_new_tokens": 64, "do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert (sampled["num_predict"], sampled["temperature"], sampled["top_p"]) == (64, 0.7, 0.9)
    greedy = ollama_parameters({})  # nothing recorded: medlora's recommended decoding
    assert (greedy["num_predict"], greedy["temperature"], greedy["frequency_penalty"]) == (128, 0, 0.3)


def _refused(capsys, *args: str) -> str:
    code = main(["export", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and len(err) <= 300 and "Traceback" not in err, err
    assert err.startswith("medlora export: error: ")
    return err


def test_bad_inputs_are_one_line(capsys, tiny_model, tiny_adapter, tmp_path):
    out = tmp_path / "m.gguf"
    assert "needs its base model: add --base_model tiny-qwen2" in _refused(
        capsys, "--lora_weights", str(tiny_adapter), "--out", str(out))
    assert "is a LoRA adapter, not a model" in _refused(capsys, "--base_model", str(tiny_adapter), "--out", str(out))

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    err = _refused(capsys, "--base_model", str(gpt2), "--out", str(out))
    assert "architecture GPT2LMHeadModel is not supported" in err and "Qwen2ForCausalLM" in err

    out.write_bytes(b"an earlier export")
    assert "exists; pass --overwrite" in _refused(capsys, "--base_model", tiny_model, "--out", str(out))
    assert out.read_bytes() == b"an earlier export"
    assert "name the file FILE.gguf" in _refused(capsys, "--base_model", tiny_model, "--out", str(tmp_path / "m"))


def test_missing_pieces_name_their_set_up(capsys, tiny_model, tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("MEDLORA_LLAMACPP_DIR", str(tmp_path))  # a folder without llama.cpp's converter
    assert "no convert_hf_to_gguf.py" in _refused(capsys, "--base_model", tiny_model, "--out", str(tmp_path / "a.gguf"))
    monkeypatch.delenv("MEDLORA_LLAMACPP_DIR")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    assert "pip install 'medlora[gguf-export]'" in _refused(capsys, "--base_model", tiny_model, "--out",
                                                            str(tmp_path / "a.gguf"))


def test_a_failed_conversion_leaves_the_earlier_file(tiny_model, tmp_path, monkeypatch):
    import medlora.llamacpp as llamacpp
    from medlora.errors import ModelError
    from medlora.gguf_export import export_gguf

    def dies_half_way(model_dir, out_file, *args):
        out_file.write_bytes(b"GGUF half")
        raise RuntimeError("killed")

    monkeypatch.setattr(llamacpp, "convert", dies_half_way)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"an earlier export")
    with pytest.raises(ModelError, match="converter failed: killed"):
        export_gguf(tiny_model, out, overwrite=True)
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var in struct {
		Template      string
		Conversations [][]Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(in.Template))
	out := []string{}
	for _, messages := range in.Conversations {
		var text strings.Builder
		if err := tmpl.Execute(&text, map[string]any{"Messages": messages}); err != nil {
			panic(err)
		}
		out = append(out, text.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.slow  # needs Go (Debian's golang-go); Ollama itself is not run
def test_ollama_template_renders_what_the_chat_template_renders(tmp_path):
    """The Modelfile's TEMPLATE, executed by Go's text/template (what Ollama runs templates with), gives the prompt
    that `Template.chat_jinja()` (Jinja, as transformers/vLLM/llama.cpp run it) gives, for the same messages."""
    import shutil
    import subprocess

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from medlora.export_templates import ollama_template
    from medlora.templates import load_template

    if shutil.which("go") is None:
        pytest.skip("no Go toolchain (apt-get install golang-go)")
    conversations = [
        [{"role": "user", "content": "感冒的常见症状是什么？"}],
        [{"role": "system", "content": "你是医生。"}, {"role": "developer", "content": "简洁。"},
         {"role": "user", "content": "Q1 {x} }}"}, {"role": "assistant", "content": "A1\n"},
         {"role": "user", "content": "Q2"}, {"role": "user", "content": "Q2b"}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"},
         {"role": "user", "content": "Q3 \"quoted\" \\ {{ .Prompt }}"}],
    ]
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    program = tmp_path / "render.go"
    program.write_text(GO_RENDER)
    for name, system in (("med_template", ""), ("med_knowledge", ""), ("alpaca", "你是一名医生。")):
        template = load_template(name)
        template.system = system
        go_input = {"Template": ollama_template(template, "<eos>"), "Conversations": [
            [{"Role": m["role"], "Content": m["content"]} for m in c] for c in conversations]}
        proc = subprocess.run(["go", "run", str(program)], input=json.dumps(go_input), capture_output=True,
                              text=True, timeout=300, env={**os.environ, "GOCACHE": str(tmp_path / "c"),
                                                          "GOPATH": str(tmp_path / "p"), "GOFLAGS": "-mod=mod"})
        assert proc.returncode == 0, proc.stderr
        expected = [jinja.from_string(template.chat_jinja()).render(messages=c, bos_token="", eos_token="<eos>",
                                                                    add_generation_prompt=True)
                    for c in conversations]
        assert json.loads(proc.stdout) == expected, name
