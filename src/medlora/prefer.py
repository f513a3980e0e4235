"""The preference stage (`medlora finetune --stage dpo|kto`): LoRA trained on preference pairs with TRL's trainers,
on top of an SFT adapter (`--lora_weights`) or a fresh LoRA on the base model.

    pairs (any of TRL's, LLaMA-Factory's, MedicalGPT's formats; medlora.data.pair_record) → the prompts rendered and
    tokenised as SFT renders them (medlora.tokenize.tokenize_pairs), facts included → TRL's DPOTrainer / KTOTrainer
    (their losses, their reference handling: the starting adapter copied into a frozen `ref` adapter, so no second
    model in memory) → the adapter saved as SFT saves one (atomic folder, medlora.json with the template, system text
    and knowledge it answers with).

The options are finetune's (model, data, LoRA, training) plus PreferenceArgs; a recipe (`--config`), resume
(`--resume_from_checkpoint auto`), the stop signal and the output checks are SFT's.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import set_seed

from medlora.config import DataArgs, LoraArgs, ModelArgs, PreferenceArgs, TrainArgs, asdict
from medlora.data import load_records
from medlora.errors import ConfigError, MedloraError, TrainingError
from medlora.loader import recorded_knowledge, resolve_prompt
from medlora.modeling import (attach_lora, check_compile_toolchain, compiled_layers, load_adapter, load_base_model,
                              load_tokenizer, preflight_adapter, resolve_dtype)
from medlora.resilience import CheckpointMarkerCallback, GracefulStopCallback, find_resume_checkpoint
from medlora.tokenize import tokenize_pairs
from medlora.train import (LossLogCallback, LOSS_LOG, TrainResult, adapter_metadata, check_output_dir,
                           gradient_accumulation, is_main_process, save_adapter, world_size)

logger = logging.getLogger(__name__)
REFERENCE = "ref"  # the frozen copy of the starting adapter that TRL adds (the reference model)


def check_trl():
    """TRL, or one line naming the extra that installs it."""
    try:
        import trl
    except ImportError:
        raise ConfigError("--stage dpo/kto needs TRL: pip install 'medlora[prefer]'") from None
    return trl


def pair_records(data: DataArgs, knowledge, template, hashes: dict) -> list[dict]:
    """The pairs of --data_path, each with the facts its prompt shows: the pair's own `knowledge` text when it has
    one (pairs built by `medlora data pairs` record what the answers were sampled with), else those retrieved for it.
    `hashes` gets the sha256 of each file read."""
    records = load_records(data.data_path, pairs=True, hashes=hashes)
    if knowledge is None or not template.has_knowledge_slot:
        return [{**r, "knowledge": None} for r in records]
    def facts(r: dict) -> str:
        return knowledge.retrieve_turn(r["instruction"], r["input"], r.get("history") or ()).text()

    return [r if isinstance(r.get("knowledge"), str) else {**r, "knowledge": facts(r)} for r in records]


def _trainer_class(stage: str):
    """TRL's trainer for `stage`, taking medlora's token ids as they are (its own `_prepare_dataset` would tokenise
    text again, and differently from SFT); KTO's mismatched completions for its KL term are made as TRL makes them."""
    trl = check_trl()
    base = {"dpo": trl.DPOTrainer, "kto": trl.KTOTrainer}[stage]

    class Pretokenised(base):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if stage == "kto" and self.calculate_KL:  # TRL's rotation of completions within each batch
                dataset = dataset.map(lambda batch: {"KL_completion_ids": batch["completion_ids"][-1:]
                                                     + batch["completion_ids"][:-1]},
                                      batched=True, batch_size=args.per_device_train_batch_size)
            return dataset

    return Pretokenised


def _config(pref: PreferenceArgs, args: TrainArgs, cutoff_len: int, bf16: bool, has_eval: bool):
    trl = check_trl()
    config_cls = {"dpo": trl.DPOConfig, "kto": trl.KTOConfig}[pref.stage]
    extra = {}
    if pref.stage == "dpo":
        extra = {"loss_type": [pref.pref_loss], "loss_weights": [1.0]}
        if pref.sft_weight:
            extra = {"loss_type": [pref.pref_loss, "sft"], "loss_weights": [1.0, pref.sft_weight]}
    return config_cls(
        output_dir=args.output_dir, per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation(args.batch_size, args.micro_batch_size, world_size()),
        num_train_epochs=args.num_epochs, max_steps=args.max_steps, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, logging_steps=args.logging_steps,
        logging_first_step=True, eval_strategy="steps" if has_eval else "no",
        eval_steps=args.eval_steps if has_eval else None, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, bf16=bf16, use_cpu=not torch.cuda.is_available(), seed=args.seed,
        data_seed=args.seed, report_to=args.report_to if args.report_to != "auto" else "none",
        disable_tqdm=not is_main_process(), beta=pref.beta, max_length=cutoff_len, remove_unused_columns=False,
        # medlora's SFT runs without activation recomputation (TRL defaults it on: ~1.3x the compute); the reference's
        # log-probs are computed once before training instead of at every step of every epoch
        gradient_checkpointing=False, precompute_ref_log_probs=True, **extra)


@contextmanager
def answers_only_on_cpu():
    """TRL's fused LM head scores only the answer positions where it runs Triton and every position elsewhere (so
    that tile shapes stay fixed for compilers such as Neuron's). In eager PyTorch on a CPU that waste is most of a
    step: Gemma's 262k-wide head over the prompts too. While this is on, the CPU scores the answers only; the
    log-probs are the same (max difference 0.0 on the demo adapter) and a forward+backward of 8 x 280 tokens took
    11.1 s instead of 32.5 s (Zen 4, 2 cores)."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _dataset(examples: list[dict], stage: str):
    """TRL's columns: DPO takes the pairs as they are; KTO takes each pair as a desirable and an undesirable
    completion of the same prompt."""
    from datasets import Dataset

    if stage == "kto":
        examples = [row for e in examples for row in (
            {"prompt_ids": e["prompt_ids"], "completion_ids": e["chosen_ids"], "label": True},
            {"prompt_ids": e["prompt_ids"], "completion_ids": e["rejected_ids"], "label": False})]
    return Dataset.from_list(examples)


def prefer(model_args: ModelArgs, data: DataArgs, lora: LoraArgs, args: TrainArgs, pref: PreferenceArgs,
           echo=print) -> TrainResult:
    """Train a LoRA adapter on preference pairs and save it in `args.output_dir`."""
    set_seed(args.seed)
    check_trl()
    check_output_dir(args.output_dir, data)
    start = pref.lora_weights or None
    if start:
        preflight_adapter(start, model_args.base_model, model_args.allow_pickle, model_args.trust_remote_code)
    # what the prompts look like: the options given, else what the starting adapter was trained with
    template, knowledge = resolve_prompt(data.prompt(), start)
    if args.torch_compile:
        check_compile_toolchain()
    resume = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint,
                                    echo if is_main_process() else (lambda *_: None))
    read = {}  # {file: sha256 of what was read}; the pairs are read before the tokenizer loads (a bad file: at once)
    train_pairs = pair_records(data, knowledge, template, read)
    val_pairs = (pair_records(DataArgs(**{**asdict(data), "data_path": data.val_data_path}), knowledge, template, read)
                 if data.val_data_path else [])
    tokenizer = load_tokenizer(model_args.base_model, padding_side="right",
                               trust_remote_code=model_args.trust_remote_code)
    train_examples, stats = tokenize_pairs(train_pairs, template, tokenizer, data.cutoff_len)
    if not train_examples:
        raise MedloraError(f"{data.data_path}: no pair left after tokenisation ({stats.summary()})")
    val_examples = tokenize_pairs(val_pairs, template, tokenizer, data.cutoff_len)[0] if val_pairs else []
    if is_main_process():
        echo(f"[medlora] {data.data_path}: {stats.summary().replace('records', 'pairs', 1)}; {len(train_examples)} "
             f"pairs for {pref.stage}" + (f", {len(val_examples)} for validation" if val_examples else ""))

    model = load_base_model(model_args.base_model, model_args.dtype, model_args.load_8bit, model_args.load_4bit,
                            model_args.trust_remote_code)
    if start:
        model = load_adapter(model, start, model_args.allow_pickle, trainable=True)
    else:
        model = attach_lora(model, lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lora_target_modules)
    bf16 = resolve_dtype(model_args.dtype) == torch.bfloat16
    config = _config(pref, args, data.cutoff_len, bf16, bool(val_examples))
    with answers_only_on_cpu():  # the reference's log-probs are computed here, before training
        trainer = _trainer_class(pref.stage)(
            model=model, args=config, train_dataset=_dataset(train_examples, pref.stage),
            eval_dataset=_dataset(val_examples, pref.stage) if val_examples else None, processing_class=tokenizer)
    starting = {name: p.detach().clone() for name, p in model.named_parameters() if f".{REFERENCE}." in name}
    trainer.add_callback(LossLogCallback(Path(args.output_dir) / LOSS_LOG))
    trainer.add_callback(CheckpointMarkerCallback())
    stopper = GracefulStopCallback()
    trainer.add_callback(stopper)

    began = time.perf_counter()
    with stopper.installed(), compiled_layers(model, args.torch_compile), answers_only_on_cpu():
        trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - began
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    if stopper.stopped:
        return TrainResult(args.output_dir, losses[-1] if losses else None, None, wall, 0, 0.0, stats,
                           interrupted=True, log_history=history)
    drift = max(((p.detach() - starting[n]).abs().max().item() for n, p in model.named_parameters() if n in starting),
                default=0.0)
    if drift:  # TRL keeps the reference adapter frozen; if it ever did not, the run measured nothing
        raise TrainingError(f"the reference adapter changed during {pref.stage} (max change {drift:g})")
    if REFERENCE in model.peft_config:
        model.delete_adapter(REFERENCE)
    if trainer.is_world_process_zero():
        meta = adapter_metadata(model_args, data, lora, args, template, model, read)
        if knowledge is not None:
            source = data.prompt().knowledge or recorded_knowledge(start)  # what resolve_prompt took
            meta["knowledge"] = {"source": source, "sha256": knowledge.sha256}
        meta["preference"] = {**asdict(pref), "reference": "the starting adapter (frozen copy)" if start else "the base model"}
        last = {key: value for h in history for key, value in h.items() if key.startswith(("rewards/", "logps/"))}
        meta["result"] = {"train_loss": losses[-1] if losses else None,
                          "eval_loss": eval_losses[-1] if eval_losses else None, "wall_seconds": round(wall, 2),
                          **{key: round(value, 4) for key, value in last.items()}}
        save_adapter(model, tokenizer, args.output_dir, meta)
    return TrainResult(args.output_dir, losses[-1] if losses else None, eval_losses[-1] if eval_losses else None,
                       wall, stats.n_supervised_tokens, stats.n_supervised_tokens / wall if wall else 0.0, stats,
                       log_history=history)
