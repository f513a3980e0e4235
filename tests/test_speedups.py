"""Each speed-up keeps the results: same loss, same gradients, same greedy answers as the plain path."""

import torch
from transformers import DataCollatorForSeq2Seq

from medlora.config import GenerationArgs
from medlora.fastloss import supervised_loss
from medlora.generate import Generator
from medlora.modeling import attach_lora, load_base_model, load_tokenizer
from medlora.templates import load_template
from medlora.tokenize import tokenize_records
from conftest import TINY_RECORDS


def lora_batch(tiny_model):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model)
    examples, _ = tokenize_records(TINY_RECORDS, load_template("med_template"), tokenizer)
    batch = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=-100, padding=True)(examples)
    model = attach_lora(load_base_model(tiny_model, dtype="fp32"), 8, 16, 0.0, "all-linear")
    batch = {k: v.to(model.device) for k, v in batch.items()}  # the model is on CUDA where there is one
    for name, param in model.named_parameters():  # non-zero B so that LoRA matters for the gradients
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model, batch


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_supervised_only_loss_equals_plain_loss_and_gradients(tiny_model):
    model, batch = lora_batch(tiny_model)
    plain = model(**batch).loss
    plain.backward()
    expected = lora_grads(model)
    model.zero_grad()
    loss_sum, n_tokens = supervised_loss(model, batch)
    (loss_sum / n_tokens).backward()
    assert n_tokens == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(loss_sum / n_tokens, plain, rtol=1e-5)
    for name, grad in lora_grads(model).items():  # fp32 summation-order noise, relative to each tensor's scale
        assert (grad - expected[name]).abs().max() <= 1e-5 * expected[name].abs().max(), name


def test_frozen_head_cross_entropy_with_softcap_matches_autograd(monkeypatch):
    import torch.nn.functional as F

    import medlora.fastloss
    from medlora.fastloss import _FrozenHeadCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (37,))
    monkeypatch.setattr(medlora.fastloss, "CHUNK_ROWS", 8)  # several chunks and a short last one
    for softcap in (None, 3.0):
        logits = hidden @ weight.T
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        expected = F.cross_entropy(logits, targets, reduction="sum")
        (expected_grad,) = torch.autograd.grad(expected, hidden)
        fused = _FrozenHeadCrossEntropy.apply(hidden, weight, targets, softcap)
        (grad,) = torch.autograd.grad(2.5 * fused, hidden)
        assert torch.allclose(fused, expected, rtol=1e-12), softcap
        assert torch.allclose(grad, 2.5 * expected_grad, rtol=1e-10, atol=1e-12), softcap


def test_a_trained_lm_head_still_gets_its_gradient(tiny_model):
    model, batch = lora_batch(tiny_model)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    loss_sum, n = supervised_loss(model, batch)
    (loss_sum / n).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_supervised_loss_in_chunks_is_the_same(tiny_model, monkeypatch):
    import medlora.fastloss

    model, batch = lora_batch(tiny_model)
    whole, n = supervised_loss(model, batch)
    monkeypatch.setattr(medlora.fastloss, "CHUNK_ROWS", 7)
    chunked, n_chunked = supervised_loss(model, batch)
    assert n == n_chunked and torch.allclose(whole, chunked, rtol=1e-5)


def test_bf16_autocast_without_input_casting_matches_within_bf16_noise(tiny_model):
    from peft.helpers import disable_input_dtype_casting

    model, batch = lora_batch(tiny_model)
    with torch.autocast(model.device.type, dtype=torch.bfloat16):
        cast, n = supervised_loss(model, batch)
        with disable_input_dtype_casting(model):
            uncast, _ = supervised_loss(model, batch)
    assert torch.allclose(cast / n, uncast / n, rtol=2e-2)


def test_batched_merged_greedy_answers_equal_one_by_one_unmerged(tiny_model, tiny_adapter):
    gen = GenerationArgs(max_new_tokens=24)
    merged = Generator.load(tiny_model, str(tiny_adapter), dtype="fp32", merge=True)
    unmerged = Generator.load(tiny_model, str(tiny_adapter), dtype="fp32", merge=False)
    prompts = [merged.build_prompt(r["instruction"], r["input"]) for r in TINY_RECORDS]
    batched = [a.text for a in merged.generate(prompts, gen, batch_size=4)]
    single = [unmerged.generate([p], gen, batch_size=1)[0].text for p in prompts]
    assert batched == single == [r["output"] for r in TINY_RECORDS]


def test_generate_feeds_the_lm_head_contiguous_rows(tiny_model):
    # generate's prefill projects hidden[:, -1:, :], a strided view that torch's matmul serves by copying the whole
    # LM head (30 s and 4.5 GB per batch for Gemma's head); the Generator's hook hands the head contiguous rows
    # (with one row too: a [1, 1, hidden] view of a longer sequence counts as contiguous but keeps its strides)
    generator = Generator.load(tiny_model)
    seen = []
    generator.model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen.append((tuple(args[0].shape), args[0].stride())))
    prompts = ["短问题", "一个长得多的问题，需要更多的词元来描述它"]
    for batch_size, continuous in ((2, False), (1, False), (2, True), (1, True)):
        generator.generate(prompts, GenerationArgs(max_new_tokens=3), batch_size=batch_size, continuous=continuous)
    assert {shape[0] for shape, _ in seen} == {1, 2}
    assert all(stride == torch.empty(shape).stride() for shape, stride in seen)


def test_busy_cores_sees_another_process_and_threads_leave_it_alone(monkeypatch):
    import subprocess
    import sys

    import medlora.modeling as modeling

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert modeling.busy_cores(0.5) >= 0.5  # a core's worth of CPU time, not the load average's history
    finally:
        busy.kill()
        busy.wait()
    before = torch.get_num_threads()
    monkeypatch.delenv("MEDLORA_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(modeling, "busy_cores", lambda: 64.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # with CUDA it keeps torch's own count
    try:
        assert modeling.configure_threads() == 1
        monkeypatch.setenv("MEDLORA_THREADS", "2")
        assert modeling.configure_threads() == 2
    finally:
        torch.set_num_threads(before)


def _two_steps(generator, encoded, **penalties) -> tuple:
    """The processed scores of two greedy steps for `encoded` prompts, with the Generator's penalties."""
    kwargs = generator._generate_kwargs(GenerationArgs(max_new_tokens=2, **penalties), encoded["input_ids"].shape[1])
    return generator.model.generate(**encoded, **kwargs, output_scores=True, return_dict_in_generate=True).scores


def test_repetition_penalty_counts_the_answers_tokens_not_the_prompts(tiny_model, tiny_adapter):
    generator = Generator.load(tiny_model, str(tiny_adapter), dtype="fp32")
    prompts = [generator.build_prompt(r["instruction"], r["input"]) for r in TINY_RECORDS[:2]]
    encoded = generator._encode(prompts, GenerationArgs())  # left-padded: the two prompts differ in length
    plain, penalised = _two_steps(generator, encoded), _two_steps(generator, encoded, repetition_penalty=1e4)
    assert torch.equal(plain[0], penalised[0])  # nothing generated yet: the prompt's tokens are not penalised
    first = plain[0].argmax(-1)
    rows = torch.arange(len(prompts))
    assert torch.all(penalised[1][rows, first] < plain[1][rows, first])  # the answer's own token is pushed down
    # Every answer token distinct under a prohibitive penalty, through the public API (batched and streamed).
    answers = generator.generate(prompts, GenerationArgs(max_new_tokens=16, repetition_penalty=1e4), batch_size=2)
    for answer in answers:
        ids = generator.tokenizer(answer.text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(set(ids)) > 0
    streamed = "".join(generator.stream(prompts[0], GenerationArgs(max_new_tokens=16, repetition_penalty=1e4)))
    assert streamed == answers[0].text


def test_frequency_and_presence_penalties_count_the_answers_tokens():
    from medlora.generate import AnswerCountPenalty

    prompt = torch.tensor([[5, 5, 5, 7]])
    scores = torch.zeros(1, 10)
    assert torch.equal(AnswerCountPenalty(4, 0.5, 0.25)(prompt, scores.clone()), scores)  # the prompt is not counted
    with_answer = torch.cat([prompt, torch.tensor([[3, 3, 3, 7]])], dim=1)
    out = AnswerCountPenalty(4, 0.5, 0.25)(with_answer, scores.clone())
    assert out[0, 3] == -(3 * 0.5 + 0.25) and out[0, 7] == -(0.5 + 0.25) and out[0, 5] == 0 and out[0, 0] == 0


def test_frequency_and_presence_penalties_through_generate(tiny_model):
    generator = Generator.load(tiny_model, dtype="fp32")
    encoded = generator._encode(["短问题", "一个长得多的问题，需要更多的词元"], GenerationArgs())  # left-padded
    plain, penalised = _two_steps(generator, encoded), _two_steps(generator, encoded, frequency_penalty=1.5,
                                                                  presence_penalty=0.5)
    assert torch.equal(plain[0], penalised[0])
    first, rows = plain[0].argmax(-1), torch.arange(2)
    assert torch.allclose(penalised[1][rows, first], plain[1][rows, first] - 2.0)


def _step_batches(tiny_model, tmp_path, **train_args) -> tuple[list[list[dict]], list[int]]:
    """The training micro-batches medlora's Trainer feeds, grouped by optimizer step (global batch 8, micro 2), and
    the lengths of the 16 examples it was given."""
    from datasets import Dataset

    from medlora.config import TrainArgs
    from medlora.train import build_trainer

    tokenizer = load_tokenizer(tiny_model, padding_side="right")
    records = [{"instruction": f"问题{i}", "input": "", "output": "答" * (1 + 5 * (i % 8))} for i in range(16)]
    examples, _ = tokenize_records(records, load_template("med_template"), tokenizer)
    args = TrainArgs(output_dir=str(tmp_path), batch_size=8, micro_batch_size=2, num_epochs=1, report_to="none",
                     **train_args)
    trainer = build_trainer(load_base_model(tiny_model, dtype="fp32"), tokenizer,
                            Dataset.from_list(examples), None, args, bf16=False)
    batches = list(trainer.get_train_dataloader())
    accumulation = trainer.args.gradient_accumulation_steps
    steps = [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]
    return steps, sorted(len(e["input_ids"]) for e in examples)


def _padding(steps) -> int:
    return sum(int((b["attention_mask"] == 0).sum()) for step in steps for b in step)


def test_each_step_is_sorted_into_micro_batches_by_length_with_less_padding(tiny_model, tmp_path):
    sorted_steps, lengths = _step_batches(tiny_model, tmp_path / "a")
    random_steps, _ = _step_batches(tiny_model, tmp_path / "b", sort_within_step=False)
    for steps in (sorted_steps, random_steps):  # both: two steps of 8 examples, each example once
        assert [sum(len(b["input_ids"]) for b in step) for step in steps] == [8, 8]
        assert sorted(int(row.sum()) for step in steps for b in step for row in b["attention_mask"]) == lengths
    for step in sorted_steps:  # within a step, each micro-batch holds neighbours in length order
        spans = sorted((int(b["attention_mask"].sum(1).min()), int(b["attention_mask"].sum(1).max())) for b in step)
        assert all(high <= next_low for (_, high), (next_low, _) in zip(spans, spans[1:])), spans
    assert _padding(sorted_steps) < _padding(random_steps)


def test_a_steps_gradient_does_not_depend_on_its_split_into_micro_batches(tiny_model):
    model, batch = lora_batch(tiny_model)  # 8 examples of different lengths; loss over the step's tokens
    total = int((batch["labels"][:, 1:] != -100).sum())
    lengths = batch["attention_mask"].sum(1)

    def accumulated(order):
        model.zero_grad()
        for part in (order[:3], order[3:5], order[5:]):  # uneven micro-batches, as batch_rebalance makes them
            loss_sum, _ = supervised_loss(model, {k: v[part] for k, v in batch.items()})
            (loss_sum / total).backward()
        return lora_grads(model)

    by_index = accumulated(torch.arange(8))
    by_length = accumulated(torch.argsort(lengths, descending=True))
    for name, grad in by_length.items():
        assert (grad - by_index[name]).abs().max() <= 1e-5 * by_index[name].abs().max(), name


def test_loraplus_gives_the_b_matrices_the_ratio_times_the_rate_and_trains_them(tiny_model, tmp_path):
    from datasets import Dataset

    from medlora.config import TrainArgs
    from medlora.train import build_trainer

    model, _ = lora_batch(tiny_model)
    tokenizer = load_tokenizer(tiny_model, padding_side="right")
    examples, _ = tokenize_records(TINY_RECORDS, load_template("med_template"), tokenizer)
    args = TrainArgs(output_dir=str(tmp_path), batch_size=4, micro_batch_size=4, max_steps=1, learning_rate=1e-3,
                     warmup_steps=0, loraplus_lr_ratio=16, report_to="none")
    trainer = build_trainer(model, tokenizer, Dataset.from_list(examples), None, args, bf16=False)
    rates = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and {id(p) for p in trained.values()} == set(rates)
    for name, param in trained.items():
        assert rates[id(param)] == (16e-3 if "lora_B" in name else 1e-3), name
    before = {n: p.detach().clone() for n, p in trained.items()}
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in trained.items() if "lora_B" in n)


def test_validation_loss_is_the_token_mean_whatever_the_batching(tiny_model, monkeypatch):
    """The fast validation loss (sorted, large batches, no autograd) equals the plain per-example model loss
    averaged over all supervised tokens; the batch budget does not change it."""
    from datasets import Dataset

    import medlora.fastloss
    from medlora.fastloss import validation_loss

    model, _ = lora_batch(tiny_model)
    tokenizer = load_tokenizer(tiny_model)
    examples, _ = tokenize_records(TINY_RECORDS * 3, load_template("med_template"), tokenizer)
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=-100, padding=True)
    total = count = 0
    with torch.no_grad():
        for example in examples:  # one at a time: no padding at all
            batch = {k: torch.tensor([v], device=model.device) for k, v in example.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + float(model(**batch).loss) * n, count + n
    dataset = Dataset.from_list(examples)
    fast = validation_loss(model, dataset, collator)
    assert abs(fast - total / count) <= 1e-5 * total / count
    monkeypatch.setattr(medlora.fastloss, "EVAL_BATCH_TOKENS", 16)  # one example a batch
    assert abs(validation_loss(model, dataset, collator) - fast) <= 1e-6 * fast
    assert model.training  # left as it was found


def test_torch_compile_gives_the_eager_loss_and_gradients_and_leaves_plain_layers(tiny_model, tmp_path, monkeypatch):
    """Traced through dynamo and AOTAutograd as in training; inductor's C++ code generation is left to the bench
    (bench/run.py's train_compiled line, with the held-out loss): compiling it here would cost about a minute."""
    import os

    from medlora.modeling import compiled_layers, repeated_blocks

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model, batch = lora_batch(tiny_model)
    eager = model(**batch).loss
    eager.backward()
    expected = lora_grads(model)
    keys = list(model.state_dict())
    with compiled_layers(model, backend="aot_eager") as compiled:
        assert len(compiled.layers) == model.config.num_hidden_layers
        assert all(layer._compiled_call_impl is not None for layer in compiled.layers)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith("compile")  # in $MEDLORA_HOME, kept between runs
        model.zero_grad()
        compiled_loss = model(**batch).loss
        compiled_loss.backward()
        got = lora_grads(model)
    assert torch.allclose(compiled_loss, eager, rtol=1e-5)
    assert all((got[n] - expected[n]).abs().max() <= 1e-4 * expected[n].abs().max() for n in expected)
    assert all(layer._compiled_call_impl is None for layer in repeated_blocks(model))
    assert list(model.state_dict()) == keys


def test_torch_compile_without_a_cxx_compiler_fails_before_loading(monkeypatch):
    import shutil

    import pytest

    from medlora.errors import ConfigError
    from medlora.modeling import check_compile_toolchain

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--torch_compile needs a C\\+\\+ compiler"):
        check_compile_toolchain()
