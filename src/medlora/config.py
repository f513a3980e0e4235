"""Typed options, split by concern, each field documented; the CLI is generated from them.

Defaults are the seed recipe's (alpaca-lora / Huatuo). Fields with `aliases` also accept the seed's names.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path

from medlora.errors import ConfigError
from medlora.io import check_output_folder


def opt(default, help: str, aliases: tuple[str, ...] = (), choices=None, metavar: str | None = None,
        default_help: str | None = None):
    """A field that is also a command-line option: `--NAME` (and `aliases`), with `help`, followed by "(default:
    `default_help`)", or the default's repr."""
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices, "metavar": metavar,
                                            "default_help": default_help})


def same_option(cls, name: str, default, default_help: str | None = None):
    """`cls`'s option `name` (its flag, aliases and help, declared once there) with another default: finetune's
    DataArgs declares PromptArgs' options so."""
    return field(default=default, metadata={**cls.__dataclass_fields__[name].metadata, "default_help": default_help})


@dataclass
class ModelArgs:
    base_model: str = opt("gemma3-270m", "built-in name (see `medlora models`), local folder or cached hub name")
    dtype: str = opt("auto", "weights dtype: auto (bf16 where native, else fp32), bf16, fp32, fp16 (GPU only)",
                     aliases=("--torch_dtype",))
    load_8bit: bool = opt(False, "load the base model in 8-bit (bitsandbytes, CUDA only)", aliases=("--load_in_8bit",))
    load_4bit: bool = opt(False, "load the base model in 4-bit NF4 (bitsandbytes, CUDA only)", aliases=("--load_in_4bit",))
    trust_remote_code: bool = opt(False, "allow model code from the model folder to run (off unless asked)")
    allow_pickle: bool = opt(False, "allow loading a pickled adapter_model.bin (can run arbitrary code)")


@dataclass
class PromptArgs:
    """How a model is prompted: its template, the knowledge retrieved into its prompts, its system text. The commands
    that run a model leave each None: what the adapter (or merged model) records in medlora.json, else the defaults
    (the one rule: loader.resolve_prompt). finetune's DataArgs declares the same options with its own defaults."""

    prompt_template: str | None = opt(None, "template name (med_template/chinese_med, med_knowledge, alpaca, chat) or "
                                            "JSON file", aliases=("--template", "--prompt_template_name"),
                                      metavar="TEMPLATE",
                                      default_help="the adapter's, else med_template, or med_knowledge with knowledge")
    knowledge: str | None = opt(None, "put facts retrieved from a knowledge base into the prompt (knowledge-tuning, "
                                      "docs/knowledge.md): kb, cmekg, both, a JSONL/YAML file, or none",
                                metavar="SOURCE", default_help="the source the adapter was trained with, else none")
    system: str | None = opt(None, "system text before every record or conversation without its own", metavar="TEXT",
                             default_help="the adapter's, else none")


@dataclass
class DataArgs:
    data_path: str = opt("data/medqa/train.jsonl", "training records: .json/.jsonl/.csv/.parquet, a folder, or a "
                                                   "dataset name", aliases=("--data",))
    prompt_template: str = same_option(PromptArgs, "prompt_template", "",
                                       "med_template, or med_knowledge with --knowledge")
    knowledge: str = same_option(PromptArgs, "knowledge", "none")
    knowledge_noise: float = opt(0.2, "with --knowledge: the share of training records given an irrelevant, partial "
                                      "or missing entry, so that the model learns to ignore bad facts")
    columns: str = opt("", "map source columns to fields, e.g. instruction=问题,output=回答 (or "
                           "conversations=对话)")
    data_format: str = opt("auto", "record format: alpaca (instruction/input/output, optional history and system), "
                                   "sharegpt (conversations of from/value), messages (role/content), or auto (by the "
                                   "first record of each file)", choices=("auto", "alpaca", "sharegpt", "messages"))
    system: str = same_option(PromptArgs, "system", "",
                              "none; recorded in the adapter and used by default at inference")
    train_on_last_turn_only: bool = opt(False, "in conversations, train on the last assistant turn only (default: "
                                               "on every assistant turn)")
    cutoff_len: int = opt(256, "maximum tokens per example (prompt + answer + EOS); longer ones are truncated")
    val_set_size: float = opt(0.0, "held-out validation records: a count, or a fraction when below 1")
    val_data_path: str = opt("", "a separate validation file (instead of holding records out of --data_path)")
    train_on_inputs: bool = opt(False, "also train on the prompt tokens (default: prompt labels are masked)")
    add_eos_token: bool = opt(True, "append EOS to every answer so the model learns to stop")

    def __post_init__(self):
        if self.cutoff_len < 2:
            raise ConfigError("--cutoff_len must be at least 2 (a prompt token and an answer token)")
        if not self.val_set_size >= 0:
            raise ConfigError("--val_set_size must be 0 or more (a count, or a fraction when below 1)")
        if not 0 <= self.knowledge_noise <= 1:
            raise ConfigError("--knowledge_noise must be from 0 to 1")

    @property
    def knowledge_on(self) -> bool:
        return self.knowledge not in ("", "none")

    def prompt(self) -> PromptArgs:
        """These options as the loader reads them: those left at finetune's defaults are not given (None), so that
        a preference stage that starts from an adapter prompts as the adapter does."""
        return PromptArgs(self.prompt_template or None, self.knowledge if self.knowledge_on else None,
                          self.system or None)


@dataclass
class LoraArgs:
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA scaling alpha")
    lora_dropout: float = opt(0.05, "dropout on the LoRA path")
    lora_target_modules: str = opt("q_proj,v_proj", "comma-separated module names, or all-linear")

    def __post_init__(self):
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ConfigError("--lora_r and --lora_alpha must be at least 1")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("--lora_dropout must be from 0 up to (not including) 1")
        if not self.lora_target_modules.strip(" ,"):
            raise ConfigError("--lora_target_modules is empty: name the modules (e.g. q_proj,v_proj) or use all-linear")


@dataclass
class TrainArgs:
    output_dir: str = opt("lora-out", "where the adapter, checkpoints and loss log are written", aliases=("--out",))
    batch_size: int = opt(128, "global batch size (examples per optimizer step over all processes)")
    micro_batch_size: int = opt(4, "examples per forward pass; gradient accumulation is derived")
    num_epochs: float = opt(3.0, "passes over the training data")
    max_steps: int = opt(-1, "stop after this many optimizer steps (overrides num_epochs when > 0)")
    learning_rate: float = opt(3e-4, "peak learning rate")
    warmup_steps: float = opt(0.03, "warmup: a step count, or a fraction of all steps when below 1",
                              aliases=("--warmup_ratio",))
    weight_decay: float = opt(0.0, "AdamW weight decay")
    loraplus_lr_ratio: float = opt(0.0, "LoRA+ (PEFT's create_loraplus_optimizer): the LoRA B matrices learn this many "
                                        "times faster than --learning_rate (the A matrices); 0 = plain LoRA")
    eval_steps: int = opt(200, "evaluate on the validation split every N steps (needs --val_set_size)")
    save_steps: int = opt(200, "write a checkpoint every N steps")
    save_total_limit: int = opt(3, "keep at most this many checkpoints")
    logging_steps: int = opt(10, "log the training loss every N steps")
    resume_from_checkpoint: str = opt("", "checkpoint folder to resume from, or 'auto' for the newest complete one")
    group_by_length: bool = opt(False, "batch examples of similar length together: less padding (~15%% faster on "
                                       "CPU) but a different loss (+0.3%% validation loss in bench/run.py --loss-check)")
    sort_within_step: bool = opt(True, "split each optimizer step's examples (drawn at random either way) into "
                                       "micro-batches of similar length: less padding, and the step's gradient does "
                                       "not depend on the split (transformers' batch_rebalance sampler); ignored with "
                                       "--group_by_length")
    seed: int = opt(42, "random seed (data order, LoRA init, validation split)")
    save_bin: bool = opt(False, "also write adapter_model.bin (pickle) for tools that want the seed's file")
    torch_compile: bool = opt(False, "torch.compile each decoder layer (regional compilation; needs a C++ compiler "
                                     "on CPU): fused element-wise work, 1.1-1.3x faster training on 2 CPU cores "
                                     "after a one-off compile (about a minute, cached in $MEDLORA_HOME/compile): "
                                     "for runs of more than about 20 steps")
    fast_loss: bool = opt(True, "compute LM-head logits and loss only at supervised positions (same loss, faster)")
    report_to: str = opt("auto", "logging integrations: auto (tensorboard when installed), none, tensorboard, wandb")
    wandb_project: str = opt("", "Weights & Biases project (alpaca-lora's flag): with --report_to auto, log there "
                                 "(needs the wandb package)")
    wandb_run_name: str = opt("", "the run's name for the logging integrations (alpaca-lora's and Huatuo's flag)")
    wandb_watch: str = opt("", "wandb's WANDB_WATCH: false, gradients or all (alpaca-lora's flag)")
    wandb_log_model: str = opt("", "wandb's WANDB_LOG_MODEL: false, end or checkpoint (alpaca-lora's flag)")
    deepspeed: str = opt("", "DeepSpeed config JSON passed to the Trainer")
    fsdp: str = opt("", "FSDP options passed to the Trainer, e.g. 'full_shard auto_wrap'")

    def __post_init__(self):
        for name in ("batch_size", "micro_batch_size", "eval_steps", "save_steps", "save_total_limit", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1")
        if not (self.num_epochs > 0 or self.max_steps > 0):
            raise ConfigError("--num_epochs must be above 0 (or give --max_steps)")
        if not self.num_epochs < 1e6:
            raise ConfigError("--num_epochs must be a finite number of passes (below 1,000,000)")
        if not 0 < self.learning_rate < float("inf"):
            raise ConfigError("--learning_rate must be above 0")
        if not (0 <= self.warmup_steps < float("inf") and 0 <= self.weight_decay < float("inf")):
            raise ConfigError("--warmup_steps and --weight_decay must be 0 or more (and finite)")
        if not 0 <= self.seed < 2**32:
            raise ConfigError("--seed must be from 0 to 4294967295")
        if not (self.loraplus_lr_ratio == 0 or 1 <= self.loraplus_lr_ratio < float("inf")):
            raise ConfigError("--loraplus_lr_ratio must be 0 (off) or at least 1")
        if self.torch_compile and (self.deepspeed or self.fsdp):
            raise ConfigError("--torch_compile cannot be combined with --deepspeed or --fsdp (not verified with them)")
        if self.loraplus_lr_ratio and (self.deepspeed or self.fsdp):
            raise ConfigError("--loraplus_lr_ratio cannot be combined with --deepspeed or --fsdp (they build the optimizer)")
        unknown = sorted(set(self.report_to.replace(" ", "").split(",")) - {"auto", "none", "all"})
        if unknown:
            from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

            if set(unknown) - set(INTEGRATION_TO_CALLBACK):
                raise ConfigError(f"--report_to {self.report_to}: use auto, none, all or any of "
                                  f"{', '.join(INTEGRATION_TO_CALLBACK)}")
        if self.wandb_project and self.report_to == "auto" and importlib.util.find_spec("wandb") is None:
            raise ConfigError("--wandb_project: the wandb package is not installed (pip install wandb), or drop the flag")
        check_output_folder("--output_dir", self.output_dir)


STAGES = ("sft", "dpo", "kto")
# TRL's DPO losses offered: DPO (sigmoid), IPO, SLiC (hinge), robust DPO, length-normalised DPO, APO-zero
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero")


@dataclass
class PreferenceArgs:
    stage: str = opt("sft", "sft: supervised fine-tuning on instruction records; dpo or kto: preference tuning on "
                            "pairs (TRL's trainers; --data_path holds pairs: TRL's, LLaMA-Factory's or MedicalGPT's "
                            "format, or `medlora data pairs`' output)", choices=STAGES)
    lora_weights: str = opt("", "with --stage dpo/kto: the adapter to start from (an SFT adapter), trained further "
                                "against a frozen copy of itself; its template, system text and knowledge are used "
                                "unless given. Default: a new LoRA on the base model, against the base model")
    beta: float = opt(0.1, "with --stage dpo/kto: how far the tuned model may move from the reference (TRL's beta)")
    pref_loss: str = opt("sigmoid", "with --stage dpo: TRL's loss_type: sigmoid (DPO), ipo, hinge (SLiC), robust, "
                                    "sigmoid_norm, apo_zero", choices=DPO_LOSSES)
    sft_weight: float = opt(0.0, "with --stage dpo: add TRL's `sft` loss (the chosen answers' negative log-likelihood) "
                                 "with this weight, as RPO does: keeps the chosen answers likely while the pair's "
                                 "margin grows (0 = plain --pref_loss)")

    def __post_init__(self):
        if not 0 < self.beta < float("inf"):
            raise ConfigError("--beta must be above 0")
        if not 0 <= self.sft_weight < float("inf"):
            raise ConfigError("--sft_weight must be 0 or more")
        if self.lora_weights and self.stage == "sft":
            raise ConfigError("--lora_weights starts a preference stage from an adapter: give --stage dpo or kto")


@dataclass
class PairArgs:
    """`medlora data pairs`: how many prompts, how many samples, how the pairs are kept."""

    per_kind: int = opt(24, "prompts of each kind (facts, missing, emergency, unknown, calm)")
    counts: str = opt("", "prompts of some kinds instead of --per_kind, e.g. emergency=32,unknown=8")
    samples: int = opt(4, "answers sampled per prompt")
    margin: float = opt(1.0, "the least judge-score difference between chosen and rejected to keep a pair")
    seed: int = opt(42, "random seed (the prompts drawn and the sampling)")
    max_new_tokens: int = opt(128, "maximum tokens per sampled answer")
    temperature: float = opt(0.7, "sampling temperature")
    top_p: float = opt(0.95, "nucleus sampling threshold")
    max_batch_size: int = opt(32, "rows decoded together (the server's name)", aliases=("--batch_size",))

    def __post_init__(self):
        if self.per_kind < 1 or self.samples < 2 or self.max_new_tokens < 1 or self.max_batch_size < 1:
            raise ConfigError("--per_kind, --max_new_tokens and --max_batch_size must be at least 1, --samples at "
                              "least 2")
        if not (0 < self.temperature < float("inf") and 0 < self.top_p <= 1 and 0 <= self.margin < float("inf")):
            raise ConfigError("--temperature must be above 0, --top_p above 0 and at most 1, --margin 0 or more")
        self.kind_counts()  # checked here, before any model loads

    def kind_counts(self) -> dict[str, int]:
        """--counts as {kind: prompts}."""
        counts = {}
        for part in filter(None, (p.strip() for p in self.counts.split(","))):
            kind, _, number = part.partition("=")
            if not number.strip().isdigit():
                raise ConfigError(f"--counts {self.counts!r}: expected kind=number pairs, e.g. emergency=32,unknown=8")
            counts[kind.strip()] = int(number)
        return counts


# The decoding medlora recommends for its adapters, saved with each as Hugging Face's generation_config.json and used
# by infer, eval, chat and webui unless a flag overrides it: greedy, 128 new tokens, OpenAI's frequency penalty 0.3
# (without it the demo adapter loops on ~7% of answers, `贫血、贫血、…`; README, Results).
RECOMMENDED_DECODING = {"max_new_tokens": 128, "do_sample": False, "frequency_penalty": 0.3}
MIN_TEMPERATURE = 1e-5  # sampling at a lower temperature is greedy decoding (as vLLM does)


@dataclass
class GenerationArgs:
    max_new_tokens: int = opt(256, "maximum tokens generated per answer")
    do_sample: bool = opt(False, "sample instead of greedy/beam decoding")
    temperature: float = opt(0.1, "sampling temperature (with --do_sample)")
    top_p: float = opt(0.75, "nucleus sampling threshold (with --do_sample)")
    top_k: int = opt(40, "top-k sampling (with --do_sample)")
    num_beams: int = opt(1, "beam search width (the seed used 4)")
    repetition_penalty: float = opt(1.0, "penalty on tokens the answer already holds (the prompt's are not "
                                         "counted); 1.0 = none")
    frequency_penalty: float = opt(0.0, "subtracted from a token's logit once per time the answer already holds it "
                                        "(OpenAI's frequency_penalty; the prompt is not counted); 0 = none")
    presence_penalty: float = opt(0.0, "subtracted from the logit of every token the answer already holds "
                                       "(OpenAI's presence_penalty); 0 = none")
    urgent_threshold: float = opt(0.0, "greedy answers open with an urgent order (立即/立刻/马上/赶紧) when the model "
                                       "gives those openers together at least this probability, and never otherwise "
                                       "(0.5: the likelier register wins, not the likeliest single token); 0 = off")

    def to_generate_kwargs(self) -> dict:
        """generate()'s sampling arguments; the three penalties are applied by medlora.generate, on the answer."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                  "repetition_penalty": self.repetition_penalty, "frequency_penalty": self.frequency_penalty,
                  "presence_penalty": self.presence_penalty, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError("--max_new_tokens must be at least 1")
        if self.num_beams < 1:
            raise ConfigError("--num_beams must be at least 1")
        if not self.repetition_penalty > 0:
            raise ConfigError("--repetition_penalty must be above 0 (1.0 = none)")
        if not (-2 <= self.frequency_penalty <= 2 and -2 <= self.presence_penalty <= 2):
            raise ConfigError("--frequency_penalty and --presence_penalty must be between -2 and 2 (0 = none)")
        if not (self.temperature > 0 if self.do_sample else self.temperature >= 0) or self.temperature > 100:
            raise ConfigError("--temperature must be above 0 when sampling and at most 100 (0 or no --do_sample: "
                              "greedy)")
        if self.do_sample and self.temperature < MIN_TEMPERATURE:
            # dividing the logits by 1e-40 gives inf/nan and fails a whole batch; below this the argmax wins anyway
            object.__setattr__(self, "do_sample", False)
        if not 0 <= self.urgent_threshold < 1:
            raise ConfigError("--urgent_threshold must be at least 0 and below 1 (0 = off)")
        if not (0 < self.top_p <= 1 and self.top_k >= 0):
            raise ConfigError("--top_p must be above 0 and at most 1, --top_k 0 or more (0: no top-k cut)")


BOOL_WORDS = ("1", "true", "yes", "y", "on", "0", "false", "no", "n", "off")


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, group_title: str | None = None, skip=()) -> None:
    """One flag per dataclass field, in an argument group of its own."""
    add_fields(parser.add_argument_group(group_title or cls.__name__), cls, skip)


def add_fields(group, cls, skip=()) -> None:
    """One flag per field of `cls` (plus its aliases) in `group`; booleans accept `--flag`, `--flag true|false`. A
    flag not given is left out of the namespace (build_dataclass then takes the field's default), except where that
    default is None: "not given" already."""
    for f in fields(cls):
        if f.name in skip:
            continue
        names = [f"--{f.name}", *f.metadata.get("aliases", ())]
        kind = str if f.default is None else type(f.default)
        shown = f.metadata.get("default_help") or repr(f.default)
        kwargs = {"dest": f.name, "default": None if f.default is None else argparse.SUPPRESS,
                  "help": f"{f.metadata['help']} (default: {shown})"}
        if kind is bool:
            kwargs.update(type=str2bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs.update(type=kind)
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        group.add_argument(*names, **kwargs)


def build_dataclass(cls, values: dict):
    """An instance of `cls` from the entries of `values` that name its fields."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def asdict(obj) -> dict:
    return dataclasses.asdict(obj)


def model_and_prompt(model: ModelArgs | str, prompt: PromptArgs | None, keywords: dict
                     ) -> tuple[ModelArgs, PromptArgs, dict]:
    """(ModelArgs, PromptArgs, the other keywords) of a loader's arguments: `model` is a ModelArgs or a base model's
    name, and ModelArgs' and PromptArgs' fields may also come as keywords (`Generator.load("gemma3-270m",
    dtype="fp32", knowledge="none")`), over those of `model` and `prompt`."""
    if not isinstance(model, (ModelArgs, str)) or not isinstance(prompt, (PromptArgs, type(None))):
        raise TypeError("expected a ModelArgs (or a base model's name) and a PromptArgs (or None)")
    taken = {cls: {name: keywords[name] for name in keywords if name in cls.__dataclass_fields__}
             for cls in (ModelArgs, PromptArgs)}
    margs = ModelArgs(model) if isinstance(model, str) else model
    margs = dataclasses.replace(margs, **taken[ModelArgs])
    prompt = dataclasses.replace(prompt or PromptArgs(), **taken[PromptArgs])
    others = {name: value for name, value in keywords.items() if name not in {**taken[ModelArgs], **taken[PromptArgs]}}
    return margs, prompt, others


# --- recipes: `--config recipe.yaml` for every command --------------------------------------------------------

def option_kinds(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    """{option name: (kind, choices)} of a command's parser, for reading a recipe as its flags are read."""
    kinds = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
            kind = list
        elif action.type is str2bool or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            kind = bool
        else:
            kind = action.type or str
        kinds[action.dest] = (kind, action.choices)
    return kinds


def _recipe_loader():
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        """safe_load without aliases: `*a` repeated through nested anchors grows a few bytes into gigabytes."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a recipe")
            return super().compose_node(parent, index)

    return RecipeLoader


def read_recipe(path: str, kinds: dict[str, tuple], command: str) -> dict:
    """A recipe file's options for `command`, each checked against `kinds` (option_kinds of its parser): a known
    name, a value of the option's type, one of its choices."""
    import yaml

    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"--config {path}: is a folder, not a recipe file")
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = yaml.load(file.read_text(encoding="utf-8"), Loader=_recipe_loader()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of option: value")
    for key in values:
        if key not in kinds:
            raise ConfigError(f"{path}: unknown option {_excerpt(key)} (known: see `medlora {command} --help`)")
    converted = {key: _as_option_type(path, key, value, kinds[key][0]) for key, value in values.items()}
    for key, value in converted.items():
        choices = kinds[key][1]
        if choices and value not in choices:
            raise ConfigError(f"{path}: option {key!r} must be one of {', '.join(map(str, choices))}, got "
                              f"{_excerpt(value)}")
    return converted


def _as_option_type(path: str, key: str, value, kind):
    """Convert as the command line would: YAML reads `3e-4` as a string, and an empty value as null. `kind` is
    bool, int, float, str, list (a repeatable option: a list of strings, or one string) or an argparse type."""
    name = getattr(kind, "__name__", "value")
    if kind is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f"{path}: option {key!r} must be a string or a list of strings, got {_excerpt(value)}")
        return items
    if value is None and kind is str:
        return ""
    if isinstance(value, (dict, list)) or value is None or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{path}: option {key!r} must be {name}, got {_excerpt(value)}")
    try:
        if kind is bool:
            if str(value).strip().lower() not in BOOL_WORDS:
                raise ValueError(value)
            return str2bool(str(value))
        if kind is float:
            return float(value)
        return kind(str(value))  # int("8.5") fails where int(8.5) truncates
    except argparse.ArgumentTypeError as exc:  # an argparse type's own words, e.g. "expected a port number ..."
        raise ConfigError(f"{path}: option {key!r}: {str(exc)[:200]}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: option {key!r} must be {name}, got {_excerpt(value)}") from None


def _excerpt(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
