"""Continuous batching: one refill loop, shared by `medlora eval`/`infer` (Generator.generate) and the server.

A static batch runs until its longest answer ends, so rows whose answers ended early idle (the tuned model's short
answers made its tokens/s lower than the base's). Here a row leaves the batch as soon as its answer ends and a
waiting request takes its place at once: the newcomers' prompts are prefilled together, their key/value cache is
left-padded to the running batch's length and joined to it, and from then on every step decodes one token for every
row. Columns that have become padding for every row are dropped, so the cache never grows past the longest row.

Each row keeps its own settings (sampling, max_new_tokens, the three penalties on its own answer's tokens), its own
stop test and its own cancel event, so requests with different settings share one batch. Greedy answers are those
of a static `generate` call (tested on tiny-qwen2). Beam search is not done here (Generator keeps `generate` for it).

The cache is a `DynamicCache` without sliding-window layers: a sliding-window layer keeps only the last window of
columns, which cannot be left-padded and joined; the model's sliding-window mask still limits what each query sees.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from medlora.config import GenerationArgs


@dataclass
class Request:
    """One prompt to answer. `on_token` receives each new token id (streaming); setting `cancel` ends the answer at
    the next step; `tag` is the caller's own (an index, a job)."""

    ids: list[int]
    gen: GenerationArgs
    tag: object = None
    on_token: Callable[[int], None] | None = None
    cancel: threading.Event | None = None


@dataclass
class Finished:
    request: Request
    tokens: list[int]  # the answer's tokens, the ending EOS included
    reason: str  # "eos", "stop" (a stop test or the cancel event) or "length"
    seconds: float  # this row's share of the loop's time (the shares add up to the loop's wall time)


@dataclass
class _Row:
    request: Request
    tokens: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)  # how often the answer holds each token
    seconds: float = 0.0


class RefillLoop:
    """Continuous batching over `model` (eval mode, no beam search) with at most `max_rows` rows at a time.

    `eos_ids` end an answer; `stop(sequences)` (optional) says for each row whether its answer must end after its
    latest token, given each row's prompt and answer tokens (a template's stop strings, which may begin in the
    prompt); `pad_id` fills the padding columns."""

    def __init__(self, model, eos_ids: set[int], pad_id: int, max_rows: int = 8,
                 stop: Callable[[list[list[int]]], list[bool]] | None = None, urgent_ids: list[int] = ()):
        self.model, self.eos_ids, self.pad_id = model, set(eos_ids), pad_id
        self.max_rows, self.stop, self.urgent_ids = max_rows, stop, list(urgent_ids)

    @torch.inference_mode()
    def run(self, take: Callable[[int], list[Request]], finish: Callable[[Finished], None]) -> None:
        """Answer requests until none is left: `take(n)` gives up to `n` new ones (it may wait for work while the
        batch is empty, and returns [] to end the loop); `finish` gets each answer as soon as it ends."""
        device = next(self.model.parameters()).device
        rows: list[_Row] = []
        cache, mask = None, None
        last = None  # [rows, 1]: each row's latest token
        while True:
            free = self.max_rows - len(rows)
            new = [_Row(r) for r in take(free)] if free else []
            if not rows and not new:
                return
            if new:
                started = time.perf_counter()
                new_cache, new_mask, logits = self._prefill([row.request.ids for row in new], device)
                _charge(new, started)
                if rows:
                    cache, mask = _join(cache, mask, new_cache, new_mask)
                else:
                    cache, mask = new_cache, new_mask
                first = self._next_tokens(new, logits, first=True)
                last = first if not rows else torch.cat([last, first])
                rows += new
                rows, cache, mask, last = self._retire(rows, cache, mask, last, finish)
                continue  # fill any slot the prefill freed before the next step
            started = time.perf_counter()
            positions = mask.sum(-1, keepdim=True)  # each row's real tokens so far: the new one's position
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
            width = mask.shape[1]
            out = self.model(input_ids=last, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, cache_position=torch.tensor([width - 1], device=device),
                             logits_to_keep=1)
            last = self._next_tokens(rows, out.logits[:, -1, :])
            _charge(rows, started)
            rows, cache, mask, last = self._retire(rows, cache, mask, last, finish)

    def _prefill(self, prompts: list[list[int]], device):
        from transformers import DynamicCache

        width = max(len(ids) for ids in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = DynamicCache()
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, cache_position=torch.arange(width, device=device), logits_to_keep=1)
        return out.past_key_values, mask, out.logits[:, -1, :]

    def _next_tokens(self, rows: list[_Row], logits: torch.Tensor, first: bool = False) -> torch.Tensor:
        """Each row's next token from its logits, after its own penalties and sampling settings; for an answer's
        `first` token (after the prefill), its greedy --urgent_threshold too."""
        scores = penalised(logits.to(dtype=torch.float32, copy=True), rows)
        for i, row in enumerate(rows if first and self.urgent_ids else ()):
            gen = row.request.gen
            if gen.urgent_threshold and not gen.do_sample:
                scores[i:i + 1] = open_register(scores[i:i + 1], self.urgent_ids, gen.urgent_threshold)
        chosen = torch.argmax(scores, dim=-1)
        for i, row in enumerate(rows):
            if row.request.gen.do_sample:
                chosen[i] = sample(scores[i], row.request.gen)
        for row, token in zip(rows, chosen.tolist()):
            row.tokens.append(token)
            row.counts[token] = row.counts.get(token, 0) + 1
            if row.request.on_token is not None:
                row.request.on_token(token)
        return chosen.unsqueeze(-1)

    def _retire(self, rows, cache, mask, last, finish):
        """Hand ended rows to `finish` and drop them (and the columns no remaining row uses) from the batch."""
        stopped = self.stop([row.request.ids + row.tokens for row in rows]) if self.stop else [False] * len(rows)
        keep = []
        for i, (row, stop) in enumerate(zip(rows, stopped)):
            cancelled = row.request.cancel is not None and row.request.cancel.is_set()
            reason = end_reason(row.tokens, row.request.gen.max_new_tokens, self.eos_ids, stop or cancelled)
            if reason is None:
                keep.append(i)
            else:
                finish(Finished(row.request, row.tokens, reason, row.seconds))
        if len(keep) == len(rows):
            return rows, cache, mask, last
        rows = [rows[i] for i in keep]
        if not rows:
            return [], None, None, None
        index = torch.tensor(keep, device=mask.device)
        mask, last = mask[index], last[index]
        lead = int((mask.cumsum(-1) == 0).sum(-1).min())  # columns that are padding in every row
        mask = mask[:, lead:]
        for layer in _filled(cache):
            layer.keys, layer.values = layer.keys[index, :, lead:], layer.values[index, :, lead:]
        return rows, cache, mask, last


def end_reason(tokens: list[int], max_new_tokens: int, eos_ids: set[int], stopped: bool = False) -> str | None:
    """Why an answer of `tokens` has ended: "eos" (its latest token ends answers), "stop" (`stopped`: a stop test or
    a cancel), "length" (`max_new_tokens` reached), or None while it goes on. The one rule for the refill loop and
    for the server's retry of a failed batch."""
    if tokens and tokens[-1] in eos_ids:
        return "eos"
    if stopped:
        return "stop"
    if len(tokens) >= max_new_tokens:
        return "length"
    return None


def _charge(rows: list[_Row], started: float) -> None:
    """Share the time since `started` (a forward pass for `rows`) equally among them."""
    share = (time.perf_counter() - started) / len(rows)
    for row in rows:
        row.seconds += share


def _filled(cache) -> list:
    """The cache's layers that hold keys and values (a layer a model never wrote to holds none)."""
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", True) and layer.keys.numel()]


def _join(cache, mask, new_cache, new_mask):
    """The running batch's cache and mask with the newcomers' appended as more rows, both left-padded to one width."""
    width = max(mask.shape[1], new_mask.shape[1])
    for layer, new in zip(_filled(cache), _filled(new_cache)):
        layer.keys = torch.cat([_left_pad(layer.keys, width), _left_pad(new.keys, width)])
        layer.values = torch.cat([_left_pad(layer.values, width), _left_pad(new.values, width)])
    return cache, torch.cat([_left_pad(mask, width), _left_pad(new_mask, width)])


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the sequence axis (the last but one of a cache tensor, the last of a mask) up to `width`."""
    axis = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def penalised(scores: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """The rows' scores after the penalties on each answer's own tokens, as Generator's `generate` applies them:
    the repetition penalty first (transformers' rule), then OpenAI's frequency and presence penalties. Only the
    scores of tokens an answer holds change, all rows in one indexed update."""
    where, counts, settings = [], [], []
    for i, row in enumerate(rows):
        gen = row.request.gen
        if gen.repetition_penalty != 1.0 or gen.frequency_penalty or gen.presence_penalty:
            for token, count in row.counts.items():
                where.append((i, token))
                counts.append(count)
                settings.append((gen.repetition_penalty, gen.frequency_penalty, gen.presence_penalty))
    if not where:
        return scores
    index = tuple(torch.tensor(where, device=scores.device).T)
    counts = torch.tensor(counts, dtype=scores.dtype, device=scores.device)
    repetition, frequency, presence = torch.tensor(settings, dtype=scores.dtype, device=scores.device).T
    seen = scores[index]
    seen = torch.where(seen < 0, seen * repetition, seen / repetition)
    scores[index] = seen - frequency * counts - presence
    return scores


def open_register(scores: torch.Tensor, urgent_ids: list[int], threshold: float) -> torch.Tensor:
    """First-token scores [rows, vocab] limited to one register per row: the urgent openers' tokens when they hold at
    least `threshold` of the probability together, every other token when not. Greedy decoding picks the likeliest
    single token, and every emergency answer of the training data opens with the same token (立即) while calm answers
    open in a hundred ways: an urgent opener with a tenth of the probability beat each calm one, and the answer told
    the writer to call 120 (docs/results.md, "Triage at the first token")."""
    urgent = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    urgent[urgent_ids] = True
    mass = torch.softmax(scores, dim=-1)[:, urgent].sum(dim=-1, keepdim=True)
    keep = torch.where(mass >= threshold, urgent, ~urgent)
    return scores.masked_fill(~keep, float("-inf"))


def sample(scores: torch.Tensor, gen: GenerationArgs) -> int:
    """A token drawn from one row's scores with its temperature, top-k and top-p (transformers' warpers)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    row = scores.unsqueeze(0)
    row = TemperatureLogitsWarper(gen.temperature)(None, row)
    if gen.top_k:
        row = TopKLogitsWarper(gen.top_k)(None, row)
    if gen.top_p < 1.0:
        row = TopPLogitsWarper(gen.top_p)(None, row)
    return int(torch.multinomial(torch.softmax(row, dim=-1), 1))
