"""A peer baseline: TRL's SFTTrainer on the bench's workload, set up as a TRL user would for the same job.

Prompt/completion records built with the same template from the same records as ours (TRL appends EOS to each
completion and masks the prompt: completion-only loss), bf16 weights and autocast, padding-free batches (each
micro-batch flattened into one row with position ids restarting per example), LoRA r=8/alpha=16/dropout 0.05 on
q_proj,v_proj, the reference's lr, warmup, micro- and global batch. Gradient checkpointing is off, as in ours
(TRL turns it on by default: it saves memory and costs time). Needs `pip install 'medlora[bench-trl]'`.
"""

from __future__ import annotations

import time

import torch

INSTALL = "pip install -e '.[bench-trl]' torch==2.13.0"  # torch named so that pip never replaces the pinned one


def trl_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl")
    except PackageNotFoundError:
        return None


def trl_train(base_path, records, template, output_dir, micro_batch_size=4, batch_size=16, lr=3e-4, seed=42,
              cutoff_len=256) -> dict:
    """One epoch with SFTTrainer; returns timing and counts like ref_recipe.ref_train."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
    data = Dataset.from_list([{"prompt": template.build_prompt(r["instruction"], r["input"]), "completion": r["output"]}
                              for r in records])
    args = SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=batch_size // micro_batch_size, num_train_epochs=1, learning_rate=lr,
        warmup_steps=0.03, logging_steps=1000, save_strategy="no", report_to="none", optim="adamw_torch",
        use_cpu=not torch.cuda.is_available(), bf16=True, seed=seed, data_seed=seed, disable_tqdm=True,
        completion_only_loss=True, padding_free=True, gradient_checkpointing=False,
        max_length=None,  # padding-free without packing does not truncate: the lengths are checked below instead
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none",
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    longest = max(len(ids) for ids in trainer.train_dataset["input_ids"])
    if longest > cutoff_len:
        raise SystemExit(f"trl baseline: a record has {longest} tokens, over cutoff_len {cutoff_len}; padding-free "
                         f"TRL would not cut it, so the workloads would differ")
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(output_dir)
    supervised = sum(sum(1 for x in labels[1:] if x != -100) for labels in trainer.train_dataset["labels"])
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    return {"seconds": seconds, "supervised_tokens": supervised, "tokens": tokens, "train_loss": output.training_loss,
            "trl": trl_version()}
