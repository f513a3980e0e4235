"""Attention for training on a CPU: two large matrix products instead of torch's CPU flash-attention kernel.

On the 2-core development CPU, SDPA's flash kernel ran the forward and backward of Gemma-3-270m's attention (4 query
heads sharing 1 key/value head, head size 256, a few hundred tokens) at about half the speed of plain matrix
products, and attention was a sixth of a training step. Here the query heads that share a key/value head are
stacked into one matrix, so the scores and the weighted values are each one batched matmul on the key/value
tensors as they are (no repeated copies), with the scores and the softmax in fp32 like the flash kernel's.
Registered with transformers' AttentionInterface as "medlora_grouped" (masks as for "sdpa").
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "medlora_grouped"


def grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      softcap=None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [batch, heads, q_len, dim], key/value [batch, kv_heads, kv_len, dim], attention_mask a boolean
    [batch, 1, q_len, kv_len] (True: attend) or None (causal) → ([batch, q_len, heads, dim], None)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    stacked = query.reshape(batch, kv_heads, groups * q_len, dim)  # the heads sharing a key/value head, one matrix
    acc = torch.promote_types(query.dtype, torch.float32)  # fp32 scores under bf16 (fp64 stays fp64)
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(stacked.to(acc), key.to(acc).transpose(2, 3)).view(batch, kv_heads, groups, q_len, kv_len)
    scores = torch.tanh(scores * (scaling / softcap)) * softcap if softcap else scores * scaling
    if attention_mask is None:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    elif attention_mask.dtype == torch.bool:
        attention_mask = attention_mask[:, :, None]
    else:  # an additive float mask
        scores = scores + attention_mask[:, :, None]
        attention_mask = None
    if attention_mask is not None:  # the lowest finite value: a row with no key to attend to stays finite
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs.view(batch, kv_heads, groups * q_len, kv_len), value)
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def training_attention(model, choice: str = "auto") -> str:
    """Set the attention kernel of `model` (a transformers model, not yet wrapped) for training and return the one
    it had, for putting back afterwards. "auto" picks the grouped attention on a CPU where the model would use
    SDPA, and leaves anything else as it is."""
    previous = model.config._attn_implementation
    if choice == "auto":
        on_cpu = next(model.parameters()).device.type == "cpu"
        choice = "grouped" if on_cpu and previous == "sdpa" else previous
    name = NAME if choice == "grouped" else choice
    if name != previous:
        model.set_attn_implementation(name)
    return previous
