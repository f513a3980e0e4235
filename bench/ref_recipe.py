"""The reference recipe (alpaca-lora / Huatuo `finetune.py` + `infer.py`), reproduced on today's libraries.

Faithful to the seed where it matters for speed and memory: full-prompt tokenisation with EOS and prompt masking,
cutoff_len 256, `DataCollatorForSeq2Seq(pad_to_multiple_of=8)`, LoRA r=8/alpha=16/dropout 0.05 on q_proj,v_proj,
lr 3e-4, AdamW (torch), fp32 on CPU (the seed's fp16 cannot run there), no length grouping, the model's full
LM-head projection and loss; inference one record at a time with num_beams=4, temperature 0.1, top_p 0.75,
top_k 40. Written for the benchmark only; nothing here is used by medlora itself.
"""

from __future__ import annotations

import time

import torch

IGNORE = -100


def ref_tokenize(records, tokenizer, template, cutoff_len=256):
    """alpaca-lora's generate_and_tokenize_prompt: tokenise the full prompt, then mask the user prompt's length."""
    examples = []
    for r in records:
        prompt = template.build_prompt(r["instruction"], r["input"])
        full = tokenizer(prompt + r["output"], truncation=True, max_length=cutoff_len)["input_ids"]
        if full[-1] != tokenizer.eos_token_id and len(full) < cutoff_len:
            full = full + [tokenizer.eos_token_id]
        user_len = len(tokenizer(prompt, truncation=True, max_length=cutoff_len)["input_ids"])
        labels = [IGNORE] * user_len + full[user_len:]
        examples.append({"input_ids": full, "attention_mask": [1] * len(full), "labels": labels})
    return examples


def ref_train(base_path, records, template, output_dir, micro_batch_size=4, batch_size=16, lr=3e-4, seed=42):
    """Train like the seed; returns timing and counts. Loads the model in fp32."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    tokenizer.padding_side = "left"  # as in alpaca-lora ("Allow batched inference"), also used in training
    examples = ref_tokenize(records, tokenizer, template)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             bias="none", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=batch_size // micro_batch_size, num_train_epochs=1, learning_rate=lr,
        warmup_steps=0.03, logging_steps=1000, save_strategy="no", report_to="none", optim="adamw_torch",
        use_cpu=not torch.cuda.is_available(), fp16=torch.cuda.is_available(), seed=seed, data_seed=seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt",
                                                           padding=True))
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(output_dir)
    supervised = sum(sum(1 for x in e["labels"][1:] if x != IGNORE) for e in examples)
    tokens = sum(len(e["input_ids"]) for e in examples)
    return {"seconds": seconds, "supervised_tokens": supervised, "tokens": tokens, "train_loss": output.training_loss}


@torch.inference_mode()
def ref_infer(model, tokenizer, template, records, max_new_tokens=128, num_beams=4):
    """The seed's infer.py loop: one record at a time, beam search."""
    from transformers import GenerationConfig

    config = GenerationConfig(temperature=0.1, top_p=0.75, top_k=40, num_beams=num_beams,
                              max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    answers, start = [], time.perf_counter()
    for r in records:
        inputs = tokenizer(template.build_prompt(r["instruction"], r["input"]), return_tensors="pt").to(model.device)
        output = model.generate(**inputs, generation_config=config)
        answers.append(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers, time.perf_counter() - start
