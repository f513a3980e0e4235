"""The fine-tuning recipe: records → tokens → LoRA on a frozen base → adapter, over `transformers.Trainer`.

    setup (data, tokenizer, model) → train (Trainer, callbacks) → save (atomic adapter folder + medlora.json)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting
from peft.optimizers import create_loraplus_optimizer
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed

from medlora import __version__
from medlora.config import RECOMMENDED_DECODING, DataArgs, LoraArgs, ModelArgs, TrainArgs, asdict
from medlora.data import load_records, split_records
from medlora.errors import ConfigError, MedloraError, TrainingError
from medlora.fastloss import release_buffers, supervised_loss, validation_loss
from medlora.io import (atomic_write_text, env_int, remove_stale_staging, replace_folder_contents,
                        staging_prefix)
from medlora.loader import template_for
from medlora.modeling import (GENERATION_CONFIG, MEDLORA_META, attach_lora, base_config, check_compile_toolchain, compiled_layers,
                              load_base_model, load_tokenizer, model_fingerprint, preflight_target_modules,
                              resolve_dtype)
from medlora.resilience import (CheckpointMarkerCallback, GracefulStopCallback, check_written, find_resume_checkpoint,
                               resume_epoch)
from medlora.tokenize import TokenizeStats, tokenize_records

logger = logging.getLogger(__name__)
LOSS_LOG = "loss_log.jsonl"


@dataclass
class TrainResult:
    adapter_dir: str
    train_loss: float | None
    eval_loss: float | None
    wall_seconds: float
    supervised_tokens: int
    tokens_per_second: float
    stats: TokenizeStats
    interrupted: bool = False
    log_history: list = field(default_factory=list)


def world_size() -> int:
    return env_int("WORLD_SIZE", 1, 1, 1_000_000)


def is_main_process() -> bool:
    return env_int("RANK", 0, 0, 1_000_000) == 0


def gradient_accumulation(batch_size: int, micro_batch_size: int, n_processes: int) -> int:
    """Steps to accumulate so that the global batch stays `batch_size` whatever the number of processes."""
    per_step = micro_batch_size * n_processes
    if batch_size < per_step or batch_size % per_step:
        raise ConfigError(
            f"--batch_size {batch_size} must be a multiple of --micro_batch_size {micro_batch_size} × "
            f"{n_processes} process(es) = {per_step}"
        )
    return batch_size // per_step


def check_sharding_options(args: TrainArgs) -> None:
    """DeepSpeed and FSDP need CUDA (on CPU the Trainer would silently run plain DDP instead of FSDP)."""
    if (args.deepspeed or args.fsdp) and not torch.cuda.is_available():
        raise ConfigError("--deepspeed/--fsdp need CUDA GPUs; on CPU launch plain data parallelism without them")
    if args.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("--deepspeed needs the deepspeed package (pip install deepspeed)")


def check_gpus_per_process() -> None:
    """Under a launcher on a CUDA machine each process needs a GPU of its own: NCCL refuses two ranks on one device
    (`Duplicate GPU detected`), after the model is loaded. Said before loading, with the two ways out."""
    local = env_int("LOCAL_WORLD_SIZE", 1, 1, 4096)
    if local > 1 and torch.cuda.is_available() and local > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise ConfigError(f"{local} processes were started on this machine but it has {gpus} CUDA GPU(s): each "
                          f"process needs its own GPU; start --nproc_per_node {gpus}, or hide the GPUs "
                          "(CUDA_VISIBLE_DEVICES=) to train on CPU")


# What a finetune output folder may already hold (an earlier run's adapter, checkpoints, logs)
OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "medlora.json", LOSS_LOG,
                GENERATION_CONFIG,
                "README.md", "runs", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json",
                "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer.model")


def check_output_dir(output_dir: str, data: DataArgs) -> None:
    """Refuse an output folder that holds other files (a data folder, a project: the adapter's files would land among
    them and the next run would fail), or that is, or holds, the training data."""
    out = Path(output_dir).resolve()
    for flag, source in (("--data_path", data.data_path), ("--val_data_path", data.val_data_path)):
        if source and Path(source).exists() and (Path(source).resolve() == out or out in Path(source).resolve().parents):
            raise ConfigError(f"--output_dir {output_dir}: holds the training data ({flag} {source}); "
                              f"choose another folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES
                        and not p.name.startswith(("checkpoint-", ".adapter-", ".")))
        if others:
            raise ConfigError(f"--output_dir {output_dir}: a non-empty folder that is not a medlora output (it holds "
                              f"{others[0]!r}{f' and {len(others) - 1} more' if len(others) > 1 else ''}); choose "
                              f"an empty or new folder")


def check_cutoff_len(base_model: str, cutoff_len: int, trust_remote_code: bool = False) -> None:
    """Fail before loading weights when examples could exceed the model's context."""
    config = base_config(base_model, trust_remote_code)  # offline, and one line for a folder that is no model
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if context and cutoff_len > context:
        raise ConfigError(f"--cutoff_len {cutoff_len} exceeds the model's context of {context} tokens")


def load_knowledge(data: DataArgs):
    """The knowledge index of --knowledge (None when off); a bad knowledge file is refused here, before any model."""
    if not data.knowledge_on:
        return None
    from medlora.knowledge import KnowledgeIndex

    return KnowledgeIndex.load(data.knowledge)


def read_training_records(data: DataArgs, seed: int) -> tuple[list[dict], list[dict], dict]:
    """The training and validation records (split off with --val_set_size, or read from --val_data_path), and
    {file: sha256 of what was read} for the adapter's medlora.json. Read before any tokenizer or model loads, so that
    a bad file is one line at once."""
    read = {}
    records = load_records(data.data_path, columns=data.columns or None, data_format=data.data_format, hashes=read)
    train_records, val_records = split_records(records, data.val_set_size, seed) if data.val_set_size else (records, [])
    if data.val_data_path:
        val_records = load_records(data.val_data_path, columns=data.columns or None, data_format=data.data_format,
                                   hashes=read)
    return train_records, val_records, read


def prepare_datasets(data: DataArgs, tokenizer, seed: int, knowledge=None, records=None):
    """Tokenised train/validation datasets and what happened on the way, reported before training. With
    `knowledge` (a KnowledgeIndex), each record gets the facts retrieved for it, the training ones with noise.
    `records`: read_training_records' result (read here when not given)."""
    from datasets import Dataset

    template = template_for(data.prompt_template, knowledge=data.knowledge_on, system=data.system)
    train_records, val_records, read = records or read_training_records(data, seed)
    if knowledge is not None:
        from medlora.databuild.noise import knowledge_for_training

        train_records, noise = knowledge_for_training(train_records, knowledge, data.knowledge_noise, seed)
        val_records, _ = knowledge_for_training(val_records, knowledge, 0.0, seed)
        logger.info("knowledge %s: facts for %d of %d training records; noise %s", data.knowledge,
                    sum(bool(r["knowledge"]) for r in train_records), len(train_records), noise)
    tokenize = dict(template=template, tokenizer=tokenizer, cutoff_len=data.cutoff_len,
                    train_on_inputs=data.train_on_inputs, add_eos_token=data.add_eos_token,
                    train_on_last_turn_only=data.train_on_last_turn_only)
    train_examples, stats = tokenize_records(train_records, **tokenize)
    if not train_examples:
        raise MedloraError(f"{data.data_path}: no training example left after tokenisation ({stats.summary()})")
    val_examples, _ = tokenize_records(val_records, **tokenize) if val_records else ([], None)
    stats.data_sha256 = read
    train_ds = Dataset.from_list(train_examples)
    val_ds = Dataset.from_list(val_examples) if val_examples else None
    return template, train_ds, val_ds, stats


def sampling_strategy(args: TrainArgs) -> str:
    """Trainer's order of examples. `batch_rebalance` draws each optimizer step's examples at random, as `random`
    does, and splits them by length into micro-batches (of balanced cost, so of uneven sizes): as the loss is summed
    over the step's supervised tokens and divided by their count (`num_items_in_batch`), that split does not change
    the step's gradient, only the padding. `group_by_length` also picks which examples share a step (similar
    lengths from a wider window), which moved the validation loss (bench/run.py --loss-check)."""
    if args.group_by_length:
        return "group_by_length"
    return "batch_rebalance" if args.sort_within_step else "random"


def build_trainer(model, tokenizer, train_ds, val_ds, args: TrainArgs, bf16: bool):
    accumulation = gradient_accumulation(args.batch_size, args.micro_batch_size, world_size())
    report_to = args.report_to
    if report_to == "auto":
        report_to = ("wandb" if args.wandb_project else
                     "tensorboard" if importlib.util.find_spec("tensorboard") else "none")
    for variable, value in (("WANDB_PROJECT", args.wandb_project), ("WANDB_WATCH", args.wandb_watch),
                            ("WANDB_LOG_MODEL", args.wandb_log_model)):
        if value:  # read by transformers' wandb callback, as in alpaca-lora
            os.environ[variable] = value
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if val_ds is not None else "no",
        eval_steps=args.eval_steps if val_ds is not None else None,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy=sampling_strategy(args),
        report_to=report_to,
        run_name=args.wandb_run_name or None,
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        deepspeed=args.deepspeed or None,
        fsdp=args.fsdp or "",
        disable_tqdm=not is_main_process(),
        log_level_replica="error",  # only rank 0 speaks (Trainer lets the other ranks warn by default)
    )
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=-100, padding=True)
    trainer_cls = SupervisedLossTrainer if args.fast_loss else Trainer
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train_ds, eval_dataset=val_ds,
                          data_collator=collator, processing_class=tokenizer,
                          optimizers=(loraplus_optimizer(model, training_args, args.loraplus_lr_ratio), None))
    trainer.add_callback(LossLogCallback(Path(args.output_dir) / LOSS_LOG))
    trainer.add_callback(CheckpointMarkerCallback())
    return trainer


def loraplus_optimizer(model, training_args: TrainingArguments, ratio: float):
    """LoRA+ (Hayou et al. 2024, PEFT's create_loraplus_optimizer): the Trainer's own optimizer class and settings,
    with the LoRA B matrices at `ratio` times the learning rate. None (the Trainer's default optimizer) when 0."""
    if not ratio:
        return None
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    kwargs = {key: value for key, value in kwargs.items() if key != "lr"}
    return create_loraplus_optimizer(model, optimizer_cls, lr=training_args.learning_rate, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=training_args.weight_decay, **kwargs)


class SupervisedLossTrainer(Trainer):
    """Trainer whose loss needs LM-head logits only where labels are supervised (see medlora.fastloss)."""

    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Under bf16 autocast the LoRA matmuls run in bf16 anyway: PEFT's cast of every LoRA input to the fp32
        # adapter dtype would only add two copies of each activation per LoRA layer.
        with disable_input_dtype_casting(model, active=self.args.bf16):
            loss_sum, n_tokens = supervised_loss(model, inputs)
        if num_items_in_batch is None:
            loss = loss_sum / max(n_tokens, 1) / self.current_gradient_accumulation_steps
        else:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        check_finite(loss, self.state.global_step + 1)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss_sum, n_tokens = supervised_loss(model, inputs)
        return (loss_sum / max(n_tokens, 1)).detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The validation loss as the mean over all supervised tokens, computed cheaply (fastloss.validation_loss,
        the loop evaluation's perplexity runs too). One process only; under a launcher or DeepSpeed/FSDP the
        Trainer's own loop runs."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.args.world_size > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled or dataset is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        started = time.perf_counter()
        loss = validation_loss(self.model, dataset, self.data_collator, bf16=self.args.bf16)
        metrics = {f"{metric_key_prefix}_loss": loss,
                   f"{metric_key_prefix}_runtime": round(time.perf_counter() - started, 4)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss.detach()).all():
        raise TrainingError(
            f"training diverged: the loss became {loss.item()} at step {step}; nothing was saved from this step on. "
            f"Lower --learning_rate or check the data"
        )


class LossLogCallback(TrainerCallback):
    """Appends every logged metric to `loss_log.jsonl` (main process only), for reports and plots."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run logs the steps after its checkpoint again, and a fresh run starts over: drop those rows
        if state.is_world_process_zero and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            atomic_write_text(self.path, "".join(f"{line}\n" for line in lines if _row_step(line) <= state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
        for key in ("loss", "eval_loss"):
            value = row.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainingError(f"training diverged: {key} became {value} at step {state.global_step}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a killed run
        return math.inf


def adapter_metadata(model_args: ModelArgs, data: DataArgs, lora: LoraArgs, args: TrainArgs, template, model,
                     data_sha256: dict) -> dict:
    return {
        "medlora_version": __version__,
        "base_model": model_args.base_model,
        "base_fingerprint": model_fingerprint(model.config),
        "template": template.to_dict(),
        "system": template.system,
        "model_args": asdict(model_args),
        "data_args": asdict(data),
        "data_sha256": data_sha256,
        "lora_args": asdict(lora),
        "train_args": asdict(args),
    }


def save_adapter(model, tokenizer, out_dir: str | Path, meta: dict, save_bin: bool = False,
                 state_dict: dict | None = None) -> Path:
    """Write adapter + tokenizer + medlora.json so that a reader sees the old adapter, the new one, or none."""
    import tempfile

    bad = next((name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
    if bad is not None:  # e.g. --learning_rate 1e308: an adapter of NaNs is not an adapter
        raise TrainingError(f"the trained weights are not finite (nan/inf in {bad.split('.lora_')[0][-60:]}): nothing "
                            f"was saved; lower --learning_rate")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir, ".adapter-")  # left by a save that was killed
    with tempfile.TemporaryDirectory(prefix=staging_prefix(".adapter-"), dir=out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        if save_bin:
            from safetensors.torch import load_file

            weights = load_file(Path(staging) / "adapter_model.safetensors")
            torch.save(weights, Path(staging) / "adapter_model.bin")
        tokenizer.save_pretrained(staging)
        atomic_write_text(Path(staging) / GENERATION_CONFIG, json.dumps(RECOMMENDED_DECODING, indent=2) + "\n")
        atomic_write_text(Path(staging) / MEDLORA_META, json.dumps(meta, ensure_ascii=False, indent=2))
        check_written(Path(staging), "adapter")
        replace_folder_contents(Path(staging), out_dir, last="adapter_config.json")
    return out_dir


def finetune(model_args: ModelArgs, data: DataArgs, lora: LoraArgs, args: TrainArgs, echo=print) -> TrainResult:
    """Train a LoRA adapter and save it in `args.output_dir`."""
    set_seed(args.seed)
    check_output_dir(args.output_dir, data)
    records = read_training_records(data, args.seed)
    knowledge = load_knowledge(data)
    check_cutoff_len(model_args.base_model, data.cutoff_len, model_args.trust_remote_code)
    preflight_target_modules(model_args.base_model, lora.lora_target_modules, model_args.trust_remote_code,
                             lora.lora_r)
    gradient_accumulation(args.batch_size, args.micro_batch_size, world_size())
    check_sharding_options(args)
    check_gpus_per_process()
    if args.torch_compile:
        check_compile_toolchain()
    resume = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint,
                                    echo if is_main_process() else (lambda *_: None))

    tokenizer = load_tokenizer(model_args.base_model, padding_side="right", trust_remote_code=model_args.trust_remote_code)
    template, train_ds, val_ds, stats = prepare_datasets(data, tokenizer, args.seed, knowledge, records)
    if is_main_process():
        echo(f"[medlora] {stats.summary()}; {len(train_ds)} train / {len(val_ds) if val_ds else 0} validation examples")

    model = load_base_model(model_args.base_model, model_args.dtype, model_args.load_8bit, model_args.load_4bit,
                            model_args.trust_remote_code)
    if model_args.load_8bit or model_args.load_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    model = attach_lora(model, lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lora_target_modules)
    bf16 = resolve_dtype(model_args.dtype) == torch.bfloat16
    trainer = build_trainer(model, tokenizer, train_ds, val_ds, args, bf16)
    stopper = GracefulStopCallback()
    trainer.add_callback(stopper)

    start = time.perf_counter()
    with stopper.installed(), compiled_layers(model, args.torch_compile):
        trainer.train(resume_from_checkpoint=resume)
    release_buffers()
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    evaluated_last_step = any("eval_loss" in h and h.get("step") == trainer.state.global_step for h in history)
    if val_ds is not None and not stopper.stopped and not evaluated_last_step:
        eval_losses.append(trainer.evaluate()["eval_loss"])
    supervised = _supervised_tokens_trained(train_ds, trainer.state.epoch or 0, resume_epoch(resume))

    if stopper.stopped:
        return TrainResult(args.output_dir, train_losses[-1] if train_losses else None, None, wall, supervised,
                           supervised / wall if wall else 0.0, stats, interrupted=True, log_history=history)
    # ZeRO-3/FSDP shard the weights: gather them on rank 0 as Trainer does (a collective every rank joins)
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    gathered = {"state_dict": trainer.accelerator.get_state_dict(trainer.model_wrapped)} if sharded else {}
    if trainer.is_world_process_zero():
        meta = adapter_metadata(model_args, data, lora, args, template, model, stats.data_sha256)
        if knowledge is not None:
            meta["knowledge"] = {"source": data.knowledge, "sha256": knowledge.sha256}
        meta["result"] = {"train_loss": train_losses[-1] if train_losses else None,
                          "eval_loss": eval_losses[-1] if eval_losses else None, "wall_seconds": round(wall, 2)}
        save_adapter(model, tokenizer, args.output_dir, meta, save_bin=args.save_bin, **gathered)
    return TrainResult(args.output_dir, train_losses[-1] if train_losses else None,
                       eval_losses[-1] if eval_losses else None, wall, supervised,
                       supervised / wall if wall else 0.0, stats, log_history=history)


def _supervised_tokens_trained(train_ds, epochs_at_end: float, epochs_at_start: float) -> int:
    """Supervised (label ≠ -100) tokens the optimizer saw in this run."""
    per_epoch = sum(sum(1 for label in labels[1:] if label != -100) for labels in train_ds["labels"])
    return int(per_epoch * max(epochs_at_end - epochs_at_start, 0))
