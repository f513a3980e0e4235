"""Base model and tokenizer loading, dtype/device choice, and LoRA attach / load / merge.

Built-in model names resolve first (see `medlora.registry`), then local folders, then the local Hugging Face
cache: nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import lru_cache
from pathlib import Path

import torch

from medlora.errors import ConfigError, MedloraError, ModelError
from medlora.io import env_int

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}
MEDLORA_META = "medlora.json"
GENERATION_CONFIG = "generation_config.json"  # an adapter's recommended decoding, in Hugging Face's file
_WARNED_RANDOM: set[str] = set()


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmul (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def configure_threads() -> int:
    """CPU threads for torch: `MEDLORA_THREADS` if set, else the cores not already kept busy by other processes.

    With every core's thread spinning at each op's barrier, one other busy process slows a 2-thread run several
    fold (measured here: 4x slower per training step than 1 thread); leaving that core alone avoids it. Busy
    cores are measured over a short window of /proc/stat, not read from the load average, which counts waiting
    kernel threads and the last minute's history (it sat near 1.0 on an idle 2-core machine here).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = env_int("MEDLORA_THREADS", None, 1, max(64, 4 * cores))
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS") or torch.cuda.is_available():
            return torch.get_num_threads()
        busy = min(cores, round(busy_cores()))
        threads = max(1, min(torch.get_num_threads(), cores - busy))
        if threads < torch.get_num_threads():
            logger.info("other processes keep %d of %d cores busy: using %d CPU thread(s) (MEDLORA_THREADS "
                        "overrides)", busy, cores, threads)
    torch.set_num_threads(threads)
    return threads


def busy_cores(window: float = 0.25) -> float:
    """Cores' worth of CPU time spent outside idle over the next `window` seconds (0 where /proc is absent)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total (in clock ticks, all cores)

    try:
        idle0, total0 = sample()
        time.sleep(window)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    if total1 <= total0:
        return 0.0
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / (total1 - total0))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str = "auto", device: str | None = None) -> torch.dtype:
    """`auto`: bf16 where the hardware computes it natively, else fp32. fp16 is refused on CPU."""
    device = device or default_device()
    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    if name not in DTYPES:
        raise ModelError(f"--dtype {name!r}: use one of auto, bf16, fp32, fp16")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device == "cpu":
        raise ModelError("--dtype fp16 is not usable on CPU (no fp16 matmul kernels: ~1000x slower); use bf16 or fp32")
    return dtype


def resolve_model_path(name_or_path: str) -> str:
    """A built-in name becomes its prepared cache folder; anything else is returned as given."""
    from medlora.registry import BUILTIN_MODELS, prepare_builtin

    if name_or_path in BUILTIN_MODELS:
        if BUILTIN_MODELS[name_or_path].random_weights and name_or_path not in _WARNED_RANDOM:
            _WARNED_RANDOM.add(name_or_path)
            logger.warning("%s has random weights: it checks the pipeline, it knows no medicine", name_or_path)
        return str(prepare_builtin(name_or_path))
    return name_or_path


def _hub_kwargs(name_or_path: str) -> dict:
    # Hub names are read from the local cache only: this toolkit never downloads weights at run time.
    return {} if Path(name_or_path).exists() else {"local_files_only": True}


def _not_found(name_or_path: str, exc: Exception) -> ModelError:
    from medlora.registry import BUILTIN_MODELS

    if Path(name_or_path).is_dir():  # there, but not a model transformers can read (a bad config, no tokenizer...)
        if not (Path(name_or_path) / "config.json").is_file():
            return ModelError(f"cannot load model {name_or_path!r}: no config.json in this folder (not a transformers "
                              f"model folder)")
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return ModelError(f"cannot load model {name_or_path!r}: the folder is there but transformers cannot read it "
                          f"({reason})")
    return ModelError(
        f"cannot load model {name_or_path!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), not a local folder "
        f"with config.json, and not in the local Hugging Face cache (nothing is downloaded) [{type(exc).__name__}]"
    )


MIN_VOCAB = 32  # a real tokenizer has thousands of tokens; an empty one has its special tokens only


# Tokenizers loaded in this process, by folder, files and settings: transformers parses Qwen's 151k-token tokenizer in
# Python (1.5-2 s a time), and one command may load the same one several times (a base and its adapters, eval's models)
_TOKENIZERS: dict[tuple, object] = {}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def load_tokenizer(name_or_path: str, padding_side: str = "right", trust_remote_code: bool = False):
    """The tokenizer, with a pad token (its own, else EOS: never a hard-coded id). A tokenizer already loaded from
    the same unchanged files is copied (a shallow copy: its own padding side, the same vocabulary)."""
    import copy

    path = resolve_model_path(name_or_path)
    folder = Path(path)
    stamp = tuple((name, (folder / name).stat().st_mtime_ns, (folder / name).stat().st_size)
                  for name in TOKENIZER_FILES if (folder / name).is_file()) if folder.is_dir() else None
    key = (str(folder.resolve()), trust_remote_code, stamp)
    if stamp is None or key not in _TOKENIZERS:
        _TOKENIZERS[key] = _read_tokenizer(name_or_path, path, trust_remote_code)
    tokenizer = copy.copy(_TOKENIZERS[key])
    tokenizer.padding_side = padding_side
    return tokenizer


def _read_tokenizer(name_or_path: str, path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **_hub_kwargs(path))
    except (OSError, ValueError) as exc:
        raise _not_found(name_or_path, exc) from None
    if len(tokenizer) < MIN_VOCAB:  # transformers 5 builds an empty tokenizer for a folder without tokenizer files
        raise ModelError(f"{name_or_path}: the tokenizer has {len(tokenizer)} token(s): its files (tokenizer.json, "
                         f"or vocab.json + merges.txt, or tokenizer.model) are missing or unreadable; copy them from "
                         f"the base model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(load_8bit: bool, load_4bit: bool, compute_dtype: torch.dtype):
    """A BitsAndBytesConfig for 8-/4-bit loading; bitsandbytes needs CUDA."""
    if not (load_8bit or load_4bit):
        return None
    if load_8bit and load_4bit:
        raise ModelError("choose one of --load_8bit and --load_4bit")
    if not torch.cuda.is_available():
        flag = "--load_8bit" if load_8bit else "--load_4bit"
        raise ModelError(f"{flag} needs a CUDA GPU (bitsandbytes); this machine has none: drop the flag")
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True
    )


def load_base_model(
    name_or_path: str,
    dtype: str = "auto",
    load_8bit: bool = False,
    load_4bit: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
):
    """The base causal LM in the chosen dtype, on `device` (CUDA when present, else CPU)."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    quant = quantization_config(load_8bit, load_4bit, torch_dtype)
    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, **_hub_kwargs(path)}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": env_int("LOCAL_RANK", 0, 0, 4096)})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise _not_found(name_or_path, exc) from None
    if quant is None:
        model.to(device)
    return model


def model_fingerprint(config) -> dict:
    """What an adapter depends on in its base: architecture and the shapes LoRA layers attach to."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {key: getattr(text_config, key, None) for key in keys}


def attach_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.05, target_modules="q_proj,v_proj"):
    """Wrap `model` in a trainable LoRA adapter; the frozen base keeps its dtype, the adapter stays fp32."""
    from peft import LoraConfig, get_peft_model

    targets = parse_target_modules(target_modules)
    check_target_modules(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config, autocast_adapter_dtype=True)


class compiled_layers:
    """Regional compilation: `torch.compile` each of the model's repeated blocks (its decoder layers) in place, for
    as long as the `with` block lasts (training), then the plain layers again. The element-wise work between the
    matmuls (norms, activations, residual adds, dtype casts, dropout masks) is fused; the first step compiles
    (about a minute on 2 cores), and inductor's caches in `$MEDLORA_HOME/compile` make later runs start sooner.
    Shapes are dynamic, so batches of other lengths do not compile again. Parameters, state_dict keys and the saved
    adapter are those of the uncompiled model."""

    def __init__(self, model, enabled: bool = True, **compile_kwargs):
        self.layers = repeated_blocks(model) if enabled else []
        self.compile_kwargs = {"dynamic": True, **compile_kwargs}

    def __enter__(self):
        if self.layers:
            from medlora.registry import medlora_home

            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(medlora_home() / "compile"))
            for layer in self.layers:
                layer.compile(**self.compile_kwargs)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: calls go to the plain forward again


def check_compile_toolchain() -> None:
    """torch.compile's CPU code is C++ built on the fly: fail before loading anything when no compiler is found."""
    import shutil

    if default_device() == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise ConfigError("--torch_compile needs a C++ compiler on PATH (g++ or clang++, or set CXX); or drop the flag")


def repeated_blocks(model) -> list[torch.nn.Module]:
    """The largest ModuleList of modules of one class (a transformer's decoder layers), or [] if there is none."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
             and len({type(child) for child in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def parse_target_modules(spec) -> str | list[str]:
    if isinstance(spec, (list, tuple)):
        return list(spec)
    spec = spec.strip().strip("[]")  # alpaca-lora's scripts write '[q_proj,k_proj,v_proj,o_proj]' (python-fire lists)
    if spec in ("all-linear", "all_linear"):
        return "all-linear"
    names = (name.strip().strip("'\"").strip() for name in spec.split(","))
    return [name for name in names if name]


def check_target_modules(model, targets) -> None:
    """Fail before training when a named target module does not exist in the base model."""
    if targets == "all-linear":
        return
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(
            f"--lora_target_modules: {', '.join(missing)} not found in this model; its linear layers are: "
            f"{', '.join(linear)} (or use all-linear)"
        )


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    """medlora.json of an adapter or merged model (template, base model, training arguments), every field that is
    read back checked by RECORD_SCHEMA; {} for foreign adapters. The one reader of medlora.json."""
    from medlora.io import read_json_object

    path = Path(adapter_dir) / MEDLORA_META
    if not path.is_file():
        return {}
    return check_record(path, read_json_object(path, ModelError, "a JSON object (medlora's record of the adapter)"))


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float))


def _is_config_value(value) -> bool:  # some architectures give a size per layer (Gemma 3n's intermediate_size)
    return _is_scalar(value) or isinstance(value, list) and all(map(_is_scalar, value))


# The fields of medlora.json that are read back (train, prefer and merge write them; other fields are a record for
# people): field -> (what it must be, its check). null means "not recorded", as an absent field does.
RECORD_SCHEMA = {
    "base_model": ("a string", lambda v: isinstance(v, str)),
    "base_fingerprint": ("an object of the base model's config values (strings, numbers, lists of them)",
                         lambda v: isinstance(v, dict) and all(map(_is_config_value, v.values()))),
    "template": ("an object (a prompt template's fields)", lambda v: isinstance(v, dict)),
    "system": ("a string", lambda v: isinstance(v, str)),
    "knowledge": ("an object with a non-empty string 'source' and a string 'sha256'",
                  lambda v: isinstance(v, dict) and isinstance(v.get("source"), str) and v["source"].strip() != ""
                  and isinstance(v.get("sha256", ""), (str, type(None)))),
    "decoding": ("an object of decoding settings", lambda v: isinstance(v, dict) and all(map(_is_scalar, v.values()))),
    "merged_from": ("an object of strings", lambda v: isinstance(v, dict) and all(map(_is_scalar, v.values()))),
}


def check_record(path, meta: dict) -> dict:
    """`meta` (medlora.json at `path`) if every field that is read back has its type, its template included (as a
    template file's fields are checked); else one ModelError line naming the file and the first bad field."""
    for key, (expected, ok) in RECORD_SCHEMA.items():
        if meta.get(key) is not None and not ok(meta[key]):
            raise ModelError(f"{path}: field {key!r} must be {expected}, got {_shown(meta[key])}")
    if meta.get("template") is not None:
        from medlora.templates import load_template

        try:
            load_template(meta["template"], where=f"{path}: field 'template'")
        except MedloraError as exc:
            raise ModelError(str(exc)[:300]) from None
    return meta


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 40 else f"{text[:37]}..."


def recorded_decoding(folder: str | Path) -> dict:
    """The decoding an adapter or a merged model was made to answer with: an adapter's generation_config.json
    (written by finetune), a merged model's `decoding` in medlora.json (copied there by merge); {} for any other
    folder, whose generation_config.json is the model maker's (a chat model's sampling), not a medlora recipe's."""
    from medlora.io import read_json_object

    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        path = folder / GENERATION_CONFIG
        return read_json_object(path, ModelError, "a JSON object of decoding settings") if path.is_file() else {}
    return read_adapter_meta(folder).get("decoding") or {}


def decoding_for(*folders, **given):
    """Decoding settings (GenerationArgs): its defaults < the decoding recorded with the first of `folders` (an adapter,
    a merged model; None skipped) that has one < the settings `given` (entries that are no GenerationArgs field are
    ignored: a command passes all its flags)."""
    from medlora.config import GenerationArgs, build_dataclass

    recorded = next((saved for saved in (recorded_decoding(f) for f in folders if f) if saved), {})
    return build_dataclass(GenerationArgs, {**recorded, **given})


def check_adapter_dir(adapter_dir: str | Path, allow_pickle: bool = False) -> Path:
    """Refuse a folder that is not a usable adapter, with the reason, before loading any weights."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise ModelError(f"--lora_weights {adapter_dir}: no such folder")
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"{path}: missing adapter_config.json (not a finished LoRA adapter folder)")
    read_adapter_config(path)
    safetensors_file = path / "adapter_model.safetensors"
    if safetensors_file.is_file():
        check_safetensors(safetensors_file)
    elif (path / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise ModelError(
                f"{path}: only a pickled adapter_model.bin is present; pickle files can run arbitrary code when "
                f"loaded. Pass --allow_pickle if you trust its source"
            )
    else:
        raise ModelError(f"{path}: no adapter_model.safetensors (or adapter_model.bin) in the folder")
    return path


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json as a dict, or one ModelError line naming the file."""
    from medlora.io import read_json_object

    return read_json_object(Path(adapter_dir) / "adapter_config.json", ModelError,
                            "a JSON object (PEFT's LoRA settings)")


def check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if keys:
                handle.get_slice(keys[-1])
        expected = _safetensors_data_end(path)
    except Exception as exc:  # safetensors raises its own error types for a broken header
        raise ModelError(f"{path}: not a readable safetensors file ({exc}); it may be truncated") from None
    if path.stat().st_size < expected:
        raise ModelError(f"{path}: truncated ({path.stat().st_size} bytes, header says {expected})")


def _safetensors_data_end(path: Path) -> int:
    with path.open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


def check_adapter_base(adapter_dir: str | Path, model) -> None:
    """Refuse an adapter trained on a different base, naming both."""
    _check_fingerprint(adapter_dir, model_fingerprint(model.config))


def base_config(base_model: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path = resolve_model_path(base_model)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **_hub_kwargs(path))
    except (OSError, ValueError) as exc:
        raise _not_found(base_model, exc) from None


def preflight_adapter(adapter_dir: str | Path, base_model: str, allow_pickle: bool = False,
                      trust_remote_code: bool = False) -> Path:
    """The adapter checks that need no weights (folder, files, base config): run them before loading the base."""
    path = check_adapter_dir(adapter_dir, allow_pickle)
    _check_fingerprint(path, model_fingerprint(base_config(base_model, trust_remote_code)))
    named = read_adapter_config(path).get("base_model_name_or_path")
    if not read_adapter_meta(path) and isinstance(named, str) and named and named != base_model \
            and Path(named).resolve() != Path(resolve_model_path(base_model)).resolve():
        # a foreign adapter (no medlora.json, so no fingerprint to check): its own record of its base differs
        logger.warning("%s: adapter_config.json names base model %r, not %r as given; check --base_model", path,
                       named, base_model)
    return path


def preflight_target_modules(base_model: str, target_modules, trust_remote_code: bool = False,
                             lora_r: int | None = None) -> None:
    """check_target_modules (and that `lora_r` fits them) on a weightless (meta-device) copy of the base, before
    data and weights are loaded."""
    from transformers import AutoModelForCausalLM

    config = base_config(base_model, trust_remote_code)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an architecture that cannot be built this way: attach_lora checks it after loading
        return
    targets = parse_target_modules(target_modules)
    check_target_modules(skeleton, targets)
    if lora_r is not None:
        check_lora_rank(skeleton, targets, lora_r)


def check_lora_rank(model, targets, lora_r: int) -> None:
    """A rank above every target layer's smaller dimension adds nothing but memory (--lora_r 100000000 asked for
    25 GB): refuse it, naming the largest useful rank."""
    head = model.get_output_embeddings()
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
              and (targets == "all-linear" or n.rsplit(".", 1)[-1] in targets)]
    largest = max((min(m.in_features, m.out_features) for m in layers), default=None)
    if largest is not None and lora_r > largest:
        raise ConfigError(f"--lora_r {lora_r} exceeds the size of the target layers: at most {largest} for this model")


def _check_fingerprint(adapter_dir: str | Path, current: dict) -> None:
    meta = read_adapter_meta(adapter_dir)
    trained_on = meta.get("base_fingerprint")
    if trained_on and trained_on != current:
        diff = ", ".join(f"{k}: {trained_on.get(k)} vs {current.get(k)}" for k in current if trained_on.get(k) != current[k])
        raise ModelError(
            f"{adapter_dir}: this adapter was trained on base model {meta.get('base_model')!r}, which differs from "
            f"the one loaded ({diff}); pass the matching --base_model"
        )


def load_adapter(model, adapter_dir: str | Path, allow_pickle: bool = False, adapter_name: str = "default",
                 trainable: bool = False):
    """Put a saved adapter on `model` (a PeftModel is returned), after checking it fits this base; `trainable`: to
    train it further (a preference stage on an SFT adapter)."""
    from peft import PeftModel

    path = check_adapter_dir(adapter_dir, allow_pickle)
    check_adapter_base(path, model)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=adapter_name)
            return model
        return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = str(exc).splitlines() or [type(exc).__name__]
        detail = next((line.strip() for line in lines if "size mismatch" in line), lines[0])  # the first, not a header
        raise ModelError(f"{path}: this adapter does not fit the base model: {detail[:300]}") from None
