"""Model preparation (issue 4): built-in models are prepared once, atomically, and rebuilt when broken.

The GGUF conversion path runs on a tiny stand-in GGUF (`gguf_standin.py`: a random 2-layer qwen2 with a
byte-level BPE tokenizer) through the same `build_from_gguf` as Gemma-3-270m; the real 270M conversion is one
`slow` test.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import run_medlora
from gguf_standin import EOS, LAYERS, vocabulary, write_standin_gguf
from medlora.registry import (
    BUILTIN_MODELS,
    READY_MARKER,
    BuiltinModel,
    build_from_gguf,
    describe_models,
    is_prepared,
    model_dir,
    prepare_builtin,
)

NAME = "standin"
SAMPLE = "the cat sat on the mat. 感冒<|endoftext|>"


@pytest.fixture(scope="session")
def standin_gguf(tmp_path_factory) -> Path:
    return write_standin_gguf(tmp_path_factory.mktemp("gguf") / "standin-f16.gguf")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty MEDLORA_HOME for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("MEDLORA_HOME", str(home))
    return home


class Builds:
    """A registry holding one stand-in built-in model whose build converts the stand-in GGUF; counts builds."""

    def __init__(self, gguf_path: Path, name: str = NAME, fail: bool = False, delay: float = 0.0):
        self.gguf_path, self.fail, self.delay = gguf_path, fail, delay
        self.count = 0
        self.registry = {name: BuiltinModel(name=name, source=f"test stand-in from {gguf_path.name}",
                                            licence="test-only", approx_size="1 MB", build=self.build)}

    def build(self, out_dir: Path) -> None:
        self.count += 1
        time.sleep(self.delay)
        build_from_gguf(self.gguf_path, out_dir)
        if self.fail:
            raise RuntimeError("build killed half-way")


def staging_leftovers(home: Path, name: str = NAME) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.iterdir() if p.is_dir() and p.name.startswith(f".{name}.")) \
        if models.exists() else []


def gguf_reference(gguf_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
    )
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


# --- the conversion path ---------------------------------------------------------------------------------------------


def test_standin_gguf_is_small_and_well_formed(standin_gguf):
    import gguf

    assert standin_gguf.stat().st_size < 2_000_000
    reader = gguf.GGUFReader(str(standin_gguf))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "qwen2"
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight",
            "blk.1.ffn_down.weight"} <= names


def test_prepared_folder_matches_the_gguf(home, standin_gguf):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    builds = Builds(standin_gguf)
    folder = prepare_builtin(NAME, registry=builds.registry)
    assert folder == home / "models" / NAME == model_dir(NAME)
    assert builds.count == 1 and is_prepared(folder)
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", READY_MARKER} <= files
    assert not staging_leftovers(home)

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == LAYERS
    assert config["vocab_size"] == len(vocabulary()[0])

    # The weights are the GGUF's own values, read independently of transformers' loader.
    import gguf

    reader = gguf.GGUFReader(str(standin_gguf))
    raw = {t.name: t for t in reader.tensors}
    saved = load_file(str(folder / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    embed = torch.from_numpy(raw["token_embd.weight"].data.astype("float32")).to(torch.bfloat16)
    assert torch.equal(saved["model.embed_tokens.weight"], embed)
    q = torch.from_numpy(raw["blk.1.attn_q.weight"].data.astype("float32")).to(torch.bfloat16)
    assert torch.equal(saved["model.layers.1.self_attn.q_proj.weight"], q)

    # A plain transformers load (no gguf_file, no quantization config) gives the GGUF's logits.
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert getattr(model.config, "quantization_config", None) is None
    reference, reference_tokenizer = gguf_reference(standin_gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(SAMPLE, return_tensors="pt").input_ids
    assert ids[0].tolist() == reference_tokenizer(SAMPLE).input_ids
    assert tokenizer.eos_token == EOS and ids[0, -1].item() == tokenizer.eos_token_id  # kept whole, special
    assert tokenizer.decode(ids[0]) == SAMPLE
    with torch.no_grad():
        got, want = model(ids).logits.float(), reference(ids).logits.float()
    assert got.shape == (1, ids.shape[1], config["vocab_size"])
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert got.std() > 0.1  # not a degenerate all-zero model


def test_marker_lists_every_file_and_second_call_does_not_rebuild(home, standin_gguf, capsys):
    builds = Builds(standin_gguf)
    first = prepare_builtin(NAME, registry=builds.registry)
    marker = json.loads((first / READY_MARKER).read_text())
    on_disk = {str(p.relative_to(first)): p.stat().st_size for p in first.rglob("*")
               if p.is_file() and p.name != READY_MARKER}
    assert marker["files"] == on_disk and "model.safetensors" in on_disk
    assert marker["name"] == NAME and marker["random_weights"] is False
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()

    second = prepare_builtin(NAME, registry=builds.registry)
    assert second == first and builds.count == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert "preparing" not in capsys.readouterr().err


# --- broken caches ---------------------------------------------------------------------------------------------------


def test_truncated_weights_are_rebuilt(home, standin_gguf):
    builds = Builds(standin_gguf)
    folder = prepare_builtin(NAME, registry=builds.registry)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert not is_prepared(folder)

    assert prepare_builtin(NAME, registry=builds.registry) == folder
    assert builds.count == 2 and is_prepared(folder) and weights.stat().st_size == size
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["missing marker", "garbled marker", "missing file", "empty folder"])
def test_half_written_folder_is_rebuilt(home, standin_gguf, damage):
    builds = Builds(standin_gguf)
    folder = prepare_builtin(NAME, registry=builds.registry)
    if damage == "missing marker":
        (folder / READY_MARKER).unlink()
    elif damage == "garbled marker":
        (folder / READY_MARKER).write_text('{"files": {"model.safetens')
    elif damage == "missing file":
        (folder / "tokenizer.json").unlink()
    else:
        for p in folder.iterdir():
            p.unlink()
    assert not is_prepared(folder)

    assert prepare_builtin(NAME, registry=builds.registry) == folder
    assert builds.count == 2 and is_prepared(folder)
    assert (folder / "tokenizer.json").is_file()


def test_leftover_staging_folder_from_a_killed_build_is_harmless(home, standin_gguf):
    models = home / "models"
    leftover = models / f".{NAME}.k1ll3d"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\0" * 100)  # half-written, no marker
    (leftover / READY_MARKER).write_text(json.dumps({"files": {}}))  # even a marker there must not count
    (models / f".{NAME}.lock").write_text("")

    builds = Builds(standin_gguf)
    folder = prepare_builtin(NAME, registry=builds.registry)
    assert builds.count == 1 and is_prepared(folder) and folder == models / NAME
    assert (folder / "model.safetensors").stat().st_size > 100
    assert prepare_builtin(NAME, registry=builds.registry) == folder and builds.count == 1


def test_failed_build_leaves_no_half_folder(home, standin_gguf):
    broken = Builds(standin_gguf, fail=True)
    with pytest.raises(RuntimeError, match="killed half-way"):
        prepare_builtin(NAME, registry=broken.registry)
    assert not model_dir(NAME).exists()
    assert staging_leftovers(home) == []

    # A corrupted folder that then fails to rebuild is gone, not left looking usable.
    good = Builds(standin_gguf)
    folder = prepare_builtin(NAME, registry=good.registry)
    (folder / READY_MARKER).unlink()
    with pytest.raises(RuntimeError):
        prepare_builtin(NAME, registry=broken.registry)
    assert not folder.exists() and staging_leftovers(home) == []

    assert prepare_builtin(NAME, registry=good.registry) == folder and good.count == 2 and is_prepared(folder)


def test_concurrent_preparation_builds_once(home, standin_gguf):
    """The file lock serialises two preparers (DDP ranks): one builds, the other waits and reuses it."""
    builds = Builds(standin_gguf, delay=0.5)
    results, errors = [], []

    def prepare():
        try:
            results.append(prepare_builtin(NAME, registry=builds.registry))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert results == [model_dir(NAME)] * 2 and builds.count == 1 and is_prepared(model_dir(NAME))


# --- `medlora models` ------------------------------------------------------------------------------------------------


def test_describe_models_reports_prepared_state(home, standin_gguf):
    rows = {r["name"]: r for r in describe_models()}
    assert set(rows) == {"tiny-qwen2", "gemma3-270m"} == set(BUILTIN_MODELS)
    assert rows["gemma3-270m"]["licence"] == "Gemma Terms of Use"
    assert rows["tiny-qwen2"]["licence"].startswith("Apache-2.0")
    assert not rows["tiny-qwen2"]["prepared"] and not rows["gemma3-270m"]["prepared"]
    assert rows["gemma3-270m"]["size"] == "~540 MB"
    assert rows["tiny-qwen2"]["path"] == str(home / "models" / "tiny-qwen2")

    # A stand-in prepared under the name `tiny-qwen2` (the real machinery, cheap weights) reads as prepared.
    stand_in = Builds(standin_gguf, name="tiny-qwen2")
    prepare_builtin("tiny-qwen2", registry=stand_in.registry)
    rows = {r["name"]: r for r in describe_models()}
    assert rows["tiny-qwen2"]["prepared"] and not rows["gemma3-270m"]["prepared"]
    assert re.fullmatch(r"\d+ MB", rows["tiny-qwen2"]["size"])

    with open(model_dir("tiny-qwen2") / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert not {r["name"]: r for r in describe_models()}["tiny-qwen2"]["prepared"]


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """The first line of each model's row in rich's table: its cells, split on the column bars."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)[1:-1]]
        if cells and cells[0] in BUILTIN_MODELS:
            rows[cells[0]] = cells
    return rows


def test_models_command_lists_licence_and_prepared(home, standin_gguf):
    env = {"MEDLORA_HOME": str(home)}
    out = run_medlora("models", env=env).stdout
    words = " ".join(out.split())
    for needed in ("tiny-qwen2", "gemma3-270m", "Apache-2.0", "Gemma Terms"):
        assert needed in out, out
    assert "Gemma" in words and "Use" in words
    rows = _table_rows(out)
    assert set(rows) == {"tiny-qwen2", "gemma3-270m"}, out
    assert rows["tiny-qwen2"][4] == "no" and rows["gemma3-270m"][4] == "no", out

    prepare_builtin("tiny-qwen2", registry=Builds(standin_gguf, name="tiny-qwen2").registry)
    out = run_medlora("models", env=env).stdout
    rows = _table_rows(out)
    assert rows["tiny-qwen2"][4] == "yes" and rows["gemma3-270m"][4] == "no", out
    assert not (home / "models" / "gemma3-270m").exists()  # listing never prepares anything


# --- the real Gemma-3-270m -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_gemma3_270m_prepares_and_loads(home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_builtin("gemma3-270m")
    assert folder == home / "models" / "gemma3-270m" and is_prepared(folder)
    assert not [p for p in (home / "models").iterdir() if p.is_dir() and p.name != "gemma3-270m"]  # no scratch
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.num_hidden_layers == 18 and model.config.vocab_size == 262144
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 262144 and torch.isfinite(logits).all()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare_builtin("gemma3-270m") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert os.environ["MEDLORA_HOME"] == str(home)
