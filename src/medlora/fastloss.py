"""Causal-LM loss that computes LM-head logits only at supervised positions.

The plain path projects every position onto the whole vocabulary (262k columns for Gemma 3) and then throws
away the prompt positions. Here the decoder runs as usual, the final hidden states are captured, and only the
rows whose next-token label is supervised go through the LM head, in chunks. With the head frozen (LoRA), each
chunk's gradient with respect to its hidden rows is computed right away in the forward pass (softmax minus
one-hot, times the head): the chunk's logits are never stored nor recomputed, and backward only scales those
rows. The loss is the same sum of token cross-entropies, the gradients the same as autograd's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ROWS = 128  # 128 x 262k fp32 logits = 128 MB at a time (and as much for their gradient)


def unwrap(model):
    """The underlying transformers model below DDP/DeepSpeed and PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def final_norm(base) -> torch.nn.Module:
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise NotImplementedError(f"{type(base).__name__}: no final norm found; use --fast_loss false")
    return norm


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of `hidden @ weight.T` (optionally soft-capped) against `targets`, for a frozen head.

    Autograd through the plain expression would keep every chunk's [rows, vocab] logits for backward or, with
    checkpointing, run the head a second time; here the gradient of each chunk is formed while its logits exist.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap):
        rows_in = hidden.to(weight.dtype)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(rows_in) if need_grad else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 logits and loss under bf16 (fp64 stays fp64)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        head_out, logits_buf, log_probs_buf = _chunk_buffers(weight, acc)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit here; out= needs it off
            for start in range(0, rows_in.shape[0], CHUNK_ROWS):
                rows = rows_in[start:start + CHUNK_ROWS]
                tgt = targets[start:start + CHUNK_ROWS]
                n = rows.shape[0]
                raw = torch.mm(rows, weight.T, out=head_out[:n])
                logits = logits_buf[:n]
                if logits.data_ptr() != raw.data_ptr():
                    logits.copy_(raw)
                if softcap:
                    capped = torch.tanh(logits / softcap)
                    torch.mul(capped, softcap, out=logits)
                log_probs = torch.ops.aten._log_softmax.out(logits, 1, False, out=log_probs_buf[:n])
                total -= log_probs.gather(1, tgt[:, None]).sum()
                if need_grad:
                    probs = log_probs.exp_()  # softmax, in place
                    probs[torch.arange(n, device=tgt.device), tgt] -= 1
                    if softcap:
                        probs.mul_(1 - capped * capped)
                    probs_in = head_out[:n].copy_(probs) if head_out.dtype != probs.dtype else probs
                    torch.mm(probs_in, weight, out=grad[start:start + n])
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total.to(grad.dtype)).to(ctx.hidden_dtype), None, None, None


_BUFFERS: dict = {}


def _chunk_buffers(weight: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[CHUNK_ROWS, vocab] work buffers, kept between calls: a fresh 128 MB tensor per chunk costs more in page
    faults (the allocator maps and unmaps it each time) than the softmax itself. `release_buffers()` frees them."""
    key = (weight.device, weight.dtype, acc, weight.shape[0], CHUNK_ROWS)
    if key not in _BUFFERS:
        _BUFFERS.clear()
        shape = (CHUNK_ROWS, weight.shape[0])
        head_out = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        logits = head_out if acc == weight.dtype else torch.empty(shape, dtype=acc, device=weight.device)
        _BUFFERS[key] = (head_out, logits, torch.empty(shape, dtype=acc, device=weight.device))
    return _BUFFERS[key]


def release_buffers() -> None:
    _BUFFERS.clear()


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, softcap) -> torch.Tensor:
    logits = lm_head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def supervised_loss(model, inputs: dict) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over supervised positions, number of those positions)."""
    base = unwrap(model)
    captured = {}
    hook = final_norm(base).register_forward_hook(lambda module, args, output: captured.__setitem__("h", output))
    try:
        forward = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        # An empty index: the model's own LM head projects nothing. (logits_to_keep=1 would slice a non-contiguous
        # [batch, 1, hidden] view, which matmul serves by copying the whole 262k-row head once per sequence.)
        no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        model(**forward, logits_to_keep=no_position, use_cache=False)
    finally:
        hook.remove()
    labels = inputs["labels"]
    targets_all = labels[:, 1:]
    mask = targets_all != IGNORE_INDEX
    hidden = captured["h"][:, :-1][mask]
    targets = targets_all[mask]
    lm_head = base.get_output_embeddings()
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    if not lm_head.weight.requires_grad and getattr(lm_head, "bias", None) is None and type(lm_head) is torch.nn.Linear:
        return _FrozenHeadCrossEntropy.apply(hidden, lm_head.weight, targets, softcap), int(targets.numel())
    total = hidden.new_zeros((), dtype=torch.float32)  # a trained or wrapped head: plain autograd, checkpointed
    for rows, row_targets in zip(hidden.split(CHUNK_ROWS), targets.split(CHUNK_ROWS)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, rows, row_targets, lm_head, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(rows, row_targets, lm_head, softcap)
    return total, int(targets.numel())


# --- the mean loss over a set of examples: training's validation loss, evaluation's perplexity ------------------

EVAL_BATCH_TOKENS = 4096  # padded tokens per validation batch (no activations are kept: larger than training's)


def validation_loss(model, examples, collate, bf16: bool = False) -> float:
    """Sum of the supervised tokens' losses over `examples` (tokenized rows: a list or a `datasets.Dataset`) divided
    by their number: the same value whatever the batching (the Trainer's loop averages per-batch means instead).
    Cheap: examples sorted by length (little padding), EVAL_BATCH_TOKENS padded tokens a batch, no autograd, bf16
    autocast when `bf16`. `collate` pads a list of examples into a batch of tensors."""
    from peft.helpers import disable_input_dtype_casting

    ids = [e["input_ids"] for e in examples] if isinstance(examples, list) else examples["input_ids"]
    lengths = [len(row) for row in ids]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, batch = [], []
    for index in order:
        if batch and lengths[batch[0]] * (len(batch) + 1) > EVAL_BATCH_TOKENS:
            batches.append(batch)
            batch = []
        batch.append(index)
    batches += [batch] if batch else []
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), \
                disable_input_dtype_casting(model, active=bf16):
            for indices in batches:
                inputs = collate([examples[i] for i in indices])
                loss_sum, n_tokens = supervised_loss(model, {k: v.to(device) for k, v in inputs.items()})
                total, count = total + float(loss_sum), count + int(n_tokens)
    finally:
        model.train(was_training)
    return total / max(count, 1)
