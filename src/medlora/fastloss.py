"""Causal-LM loss that computes LM-head logits only at supervised positions.

The plain path projects every position onto the whole vocabulary (262k columns for Gemma 3) and then throws
away the prompt positions. Here the decoder runs as usual, the final hidden states are captured, and only the
rows whose next-token label is supervised go through the LM head, in chunks, each recomputed in backward
instead of stored. The loss is the same sum of token cross-entropies.
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
    total = hidden.new_zeros((), dtype=torch.float32)
    for rows, row_targets in zip(hidden.split(CHUNK_ROWS), targets.split(CHUNK_ROWS)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, rows, row_targets, lm_head, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(rows, row_targets, lm_head, softcap)
    return total, int(targets.numel())
