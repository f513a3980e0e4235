"""Log-likelihood of continuations under a causal language model, batched: lm-evaluation-harness's `loglikelihood`.

The score of a continuation after a context is the sum of the log-probabilities the model gives its tokens, each
given the context and the continuation's tokens before it. Contexts and continuations come as token ids, tokenised
apart, so a continuation is scored as the tokens a model would write after the context (never merged into the
context's last token).

One forward pass serves every continuation of a context that shares its tokens before the last: a row holds the
context and the continuation without its last token, and the continuation's tokens are read from the last positions'
distributions. Single-token continuations (the option letters of a multiple-choice question) thus share one row, the
context itself. Rows are left-padded, so that every row ends in the last column, and only the last positions are
projected onto the vocabulary (a 262k-token head over every position would cost more than the model).
"""

from __future__ import annotations

import torch


def continuation_logprobs(model, contexts: list[list[int]], continuations: list[list[list[int]]], pad_id: int,
                          batch_size: int = 8) -> list[list[float]]:
    """For each context, the summed log-probability of each of its continuations (token ids, at least one each)."""
    rows: dict[tuple, int] = {}  # row ids -> the most continuation tokens read from its end
    for context, conts in zip(contexts, continuations):
        for cont in conts:
            if not cont:
                raise ValueError("a continuation needs at least one token")
            key = tuple(context + cont[:-1])
            rows[key] = max(rows.get(key, 0), len(cont))
    # longest first, so that rows of similar length share a batch (and the first batch shows the memory peak)
    order = sorted(rows, key=len, reverse=True)
    tails = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        keep = max(rows[key] for key in batch)
        for key, tail in zip(batch, _last_logprobs(model, batch, keep, pad_id)):
            tails[key] = tail
    scores = []
    for context, conts in zip(contexts, continuations):
        mine = []
        for cont in conts:
            tail = tails[tuple(context + cont[:-1])]  # keep x vocab; position -k+j predicts token j
            k = len(cont)
            mine.append(float(sum(tail[len(tail) - k + j, token] for j, token in enumerate(cont))))
        scores.append(mine)
    return scores


@torch.inference_mode()
def _last_logprobs(model, rows: list[tuple], keep: int, pad_id: int) -> list[torch.Tensor]:
    """Each row's log-probability distributions at its last `keep` positions (float32, keep x vocab)."""
    device = next(model.parameters()).device
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    # positions count from each row's first real token, as if it had no padding (as medlora.batching's prefill)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=False, logits_to_keep=keep)
    logprobs = torch.log_softmax(out.logits[:, -keep:, :].float(), dim=-1).cpu()
    return list(logprobs)
