"""Export a tuned model as one GGUF file (llama.cpp, Ollama) with an Ollama Modelfile beside it.

An adapter is first merged into its base with `medlora.export.merge_adapter` (which checks the merged logits);
a merged folder or a plain model folder is taken as it is. The conversion itself is llama.cpp's own
`convert_hf_to_gguf.py` (see `medlora.llamacpp`), given a view of the model folder whose tokenizer carries our
prompt template as its chat template; we add `medlora.*` keys (the template as JSON, where the model came from).
Everything is built in a temporary folder beside `--out` and renamed into place once complete: a failure leaves
no half-written file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from medlora import __version__
from medlora.errors import ConfigError, ModelError
from medlora.io import check_output_folder, current_umask, read_json_object, remove_stale_staging, staging_prefix

logger = logging.getLogger(__name__)

OUTTYPES = ("f16", "bf16", "q8_0")
# Architectures exported and checked here (llama.cpp's converter knows more; they are refused until checked).
SUPPORTED_ARCHITECTURES = ("Gemma3ForCausalLM", "Qwen2ForCausalLM")
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")


@dataclass
class GGUFReport:
    out: Path
    modelfile: Path
    outtype: str
    n_tensors: int
    size_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"GGUF written to {self.out} ({self.outtype}, {self.n_tensors} tensors, "
                 f"{self.size_bytes / 2**20:.1f} MiB, {self.seconds:.1f} s); Ollama Modelfile: {self.modelfile}"]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def modelfile_path(out: Path) -> Path:
    return out.with_suffix(".Modelfile")


def export_gguf(base_model: str | None, out: str | Path, lora_weights: str | None = None, outtype: str = "f16",
                overwrite: bool = False, prompt_template: str | None = None, trust_remote_code: bool = False,
                allow_pickle: bool = False) -> GGUFReport:
    """Write `out` (GGUF) and `out`.Modelfile; raise ConfigError/ModelError (leaving both as they were) on failure."""
    from medlora.export_templates import modelfile
    from medlora.loader import template_for
    from medlora.modeling import recorded_decoding, resolve_model_path

    started = time.perf_counter()
    out = Path(out)
    _check_inputs(base_model, lora_weights, out, outtype, overwrite)
    _check_tools()
    base_path = resolve_model_path(base_model)
    if Path(base_path).is_dir():
        _check_architecture(Path(base_path), base_model)
    elif not lora_weights:
        raise ConfigError(f"--base_model {base_model}: export reads a local model folder or a built-in name")
    template = template_for(prompt_template, lora_weights, base_path)

    remove_stale_staging(out.parent, f".{out.name}.export-")  # left by an export that was killed
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(f".{out.name}.export-"), dir=out.parent))
    try:
        model_dir = Path(base_path)
        if lora_weights:
            model_dir = _merge(base_model, lora_weights, staging / "merged", trust_remote_code, allow_pickle)
        _check_architecture(model_dir, base_model)
        meta = _meta(model_dir, base_model, lora_weights, template)
        n_tensors = _convert(model_dir, staging, out, outtype, template, meta)
        notes = _notes(meta)
        (staging / modelfile_path(out).name).write_text(
            modelfile(out.name, template, _eos_token(model_dir), notes, recorded_decoding(model_dir)), encoding="utf-8")
        for name in (out.name, modelfile_path(out).name):  # the GGUF first: a Modelfile never names a missing file
            os.chmod(staging / name, 0o666 & ~current_umask())
            os.replace(staging / name, out.parent / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return GGUFReport(out, modelfile_path(out), outtype, n_tensors, out.stat().st_size,
                      time.perf_counter() - started, notes)


def _merge(base_model: str, lora_weights: str, folder: Path, trust_remote_code: bool, allow_pickle: bool) -> Path:
    """base + adapter as one fp32 model folder (merge_adapter checks its logits against the adapter model's)."""
    from medlora.export import merge_adapter

    report = merge_adapter(base_model, lora_weights, folder, "fp32", trust_remote_code=trust_remote_code,
                           allow_pickle=allow_pickle)
    logger.info("%s", report.summary())
    return folder


def _convert(model_dir: Path, staging: Path, out: Path, outtype: str, template, meta: dict[str, str]) -> int:
    """llama.cpp's converter on a view of `model_dir` that carries our prompt as its chat template (a `chat`
    template keeps the tokenizer's own); writes staging/out.name and returns its number of tensors."""
    from medlora import llamacpp

    chat_template = None if template.use_chat_template else template.chat_jinja()
    view = _model_view(model_dir, staging / "view", chat_template)
    logger.info("converting with llama.cpp's convert_hf_to_gguf.py (%s)...", outtype)
    try:
        log = llamacpp.convert(view, staging / out.name, outtype, meta, out.stem)
    except RuntimeError as exc:
        raise ModelError(f"llama.cpp's converter failed: {exc}") from None
    found = re.findall(r"n_tensors = (\d+)", log)
    return int(found[-1]) if found else 0


# --- checks before any work ----------------------------------------------------------------------------------

def _check_inputs(base_model, lora_weights, out: Path, outtype: str, overwrite: bool) -> None:
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    if not base_model:
        if lora_weights:
            recorded = _recorded_base(lora_weights)
            raise ConfigError(f"--lora_weights {lora_weights} needs its base model: add --base_model "
                              f"{recorded or 'NAME_OR_FOLDER'} (an adapter holds only the low-rank update)")
        raise ConfigError("--base_model is required (a model folder, a merged folder or a built-in name)")
    if Path(base_model, "adapter_config.json").is_file() and not Path(base_model, "config.json").is_file():
        recorded = _recorded_base(base_model)
        raise ConfigError(f"--base_model {base_model} is a LoRA adapter, not a model: pass it as --lora_weights with "
                          f"the base it was trained on (--base_model {recorded or 'NAME_OR_FOLDER'})")
    if out.suffix != ".gguf":
        raise ConfigError(f"--out {out}: name the file FILE.gguf")
    for path in (out, modelfile_path(out)):
        if path.is_dir() or path.is_symlink():
            raise ConfigError(f"--out {out}: {path} is a folder or a link; choose a file name")
        if path.exists() and not overwrite:
            raise ConfigError(f"--out {out}: {path} exists; pass --overwrite to replace it")
    check_output_folder("--out", out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)


def _recorded_base(adapter_dir) -> str | None:
    try:
        from medlora.modeling import read_adapter_meta

        return read_adapter_meta(adapter_dir).get("base_model")
    except ModelError:
        return None


def _check_architecture(folder: Path, name: str) -> None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"--base_model {name}: no config.json in {folder} (not a transformers model folder)")
    config = read_json_object(config_file, ModelError, "a JSON object (a model config)")
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"--base_model {name}: architecture {architectures[0]} is not supported by medlora export "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def _check_tools() -> None:
    """The converter is unpacked, and sentencepiece (which it imports for Qwen2's and Gemma's vocabularies) is
    installed: said before any work, not after the merge."""
    import importlib.util

    from medlora import llamacpp

    try:
        llamacpp.converter_dir()
    except llamacpp.ConverterMissing as exc:
        raise ConfigError(f"{exc} (part of the 'gguf-export' set-up)") from None
    if importlib.util.find_spec("sentencepiece") is None:  # the CLI names the extra that brings it
        raise ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece")


# --- the folder the converter reads --------------------------------------------------------------------------

def _model_view(model_dir: Path, view: Path, chat_template: str | None) -> Path:
    """A folder of links to `model_dir`'s files whose tokenizer files carry `chat_template` (the converter writes it
    as tokenizer.chat_template; None keeps the model's own). The model folder itself is never changed."""
    view.mkdir()
    for path in model_dir.iterdir():
        if path.name.startswith(".") or (chat_template and path.name in (*CHAT_TEMPLATE_FILES, TOKENIZER_CONFIG)):
            continue
        os.symlink(path.resolve(), view / path.name)
    if chat_template:
        config_file = model_dir / TOKENIZER_CONFIG
        config = read_json_object(config_file, ModelError, "a JSON object") if config_file.is_file() else {}
        config.pop("chat_template", None)
        (view / TOKENIZER_CONFIG).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        (view / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return view


def _meta(model_dir: Path, base_model: str, lora_weights: str | None, template) -> dict[str, str]:
    from medlora.modeling import read_adapter_meta

    recorded = read_adapter_meta(model_dir)
    source = recorded.get("merged_from") or {"base_model": base_model}
    if lora_weights:
        source = {"base_model": base_model, "adapter": str(lora_weights)}
    if recorded.get("knowledge"):
        source["knowledge"] = recorded["knowledge"]
    return {"medlora.version": __version__,
            "medlora.template": json.dumps({**template.to_dict(), **({"system": template.system} if template.system
                                                                      else {})}, ensure_ascii=False),
            "medlora.source": json.dumps(source, ensure_ascii=False)}


def _eos_token(model_dir: Path) -> str:
    """The EOS token's text (what ends an answer in the prompt of a multi-turn conversation), from the tokenizer's
    config; the tokenizer itself is loaded only when the config does not name it."""
    config_file = model_dir / TOKENIZER_CONFIG
    eos = read_json_object(config_file, ModelError).get("eos_token") if config_file.is_file() else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if not isinstance(eos, str):
        from medlora.modeling import load_tokenizer

        eos = load_tokenizer(str(model_dir)).eos_token
    return eos or ""


def _notes(meta: dict[str, str]) -> list[str]:
    source = json.loads(meta["medlora.source"])
    if not source.get("knowledge"):
        return []
    return [f"this model was trained with facts from {source['knowledge'].get('source')!r} in its prompts; llama.cpp "
            f"and Ollama retrieve none, so their chat prompts say that no entry was found. For answers with facts, "
            f"send the prompt medlora builds as a raw completion (docs/usage-after-training.md)"]
