"""Batched and streaming generation over a base model with an optional LoRA adapter.

Batches are sorted by prompt length and left-padded, so little compute goes to padding; an adapter is merged
into the base weights for inference unless several adapters share one base.
"""

from __future__ import annotations

import logging
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from transformers import StoppingCriteria, TextIteratorStreamer

from medlora.batching import Finished, RefillLoop, Request, open_register
from medlora.config import GenerationArgs
from medlora.errors import ConfigError
from medlora.templates import END_OF_TURN_TOKENS, Template
from medlora.turns import Turn
from medlora.vocab import URGENT_OPENERS

if TYPE_CHECKING:
    from medlora.config import ModelArgs, PromptArgs
    from medlora.knowledge import KnowledgeIndex, Retrieved

logger = logging.getLogger(__name__)
PROMPT_ROOM_MIN = 16  # the fewest prompt tokens --max_new_tokens must leave in the context


class AnswerCountPenalty:
    """OpenAI's frequency and presence penalties on the answer's tokens (columns from `prompt_width` on): a token's
    logit loses `frequency` per time the answer already holds it, and `presence` once if it holds it at all. A list
    caught in a loop (`贫血、贫血、…`) is pushed out of it more with every turn."""

    def __init__(self, prompt_width: int, frequency: float, presence: float):
        self.prompt_width, self.frequency, self.presence = prompt_width, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        answer = input_ids[:, self.prompt_width:]
        if answer.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class FirstTokenRegister:
    """batching.open_register at the answer's first token (column `prompt_width`), for generate()'s beam search."""

    def __init__(self, prompt_width: int, urgent_ids: list[int], threshold: float):
        self.prompt_width, self.urgent_ids, self.threshold = prompt_width, urgent_ids, threshold

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.prompt_width:
            return scores
        return open_register(scores, self.urgent_ids, self.threshold)


@dataclass
class Answer:
    text: str
    n_tokens: int
    ended_by_eos: bool
    seconds: float
    cut: bool = False  # a marker ended the text (the template's, or one of the request's stop strings)


class StopOnEvent(StoppingCriteria):
    """End generation once `event` is set (Ctrl-C in chat, a stop marker reached, a client gone away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def end_token_ids(model, tokenizer, template: Template) -> set[int]:
    """Token ids that end an answer: EOS from the model and tokenizer, and, with a chat template, end-of-turn."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    if template.use_chat_template:
        vocab = tokenizer.get_vocab()
        ids |= {vocab[token] for token in END_OF_TURN_TOKENS if token in vocab}
    return {i for i in ids if i is not None}


def contiguous_head_input(model) -> None:
    """Give the LM head a freshly laid-out input. The model projects only each sequence's last position in a
    prefill, `hidden[:, -1:, :]`, a strided view, and torch's matmul serves that view by copying the whole head
    (measured: 30 s and 4.5 GB per call for Gemma's 262k x 640 bf16 head with 16 rows; 1.2 s with one row through a
    merged adapter; 0.07 s once the rows are copied). `.contiguous()` is not enough: a view with one row counts as
    contiguous (its size-1 dimensions are ignored) and keeps its strides."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_medlora_contiguous_input", False):
        return
    head.register_forward_pre_hook(
        lambda module, args: (args[0].clone(memory_format=torch.contiguous_format), *args[1:]) if args else None)
    head._medlora_contiguous_input = True


class Generator:
    """A model ready to answer: tokenizer (left padding), template, eval mode, and the knowledge its prompts
    get facts from (None: off)."""

    def __init__(self, model, tokenizer, template: Template, knowledge: "KnowledgeIndex | None" = None):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.knowledge = knowledge
        self.model.eval()
        self.eos_ids = end_token_ids(model, tokenizer, template)
        contiguous_head_input(model)

    @classmethod
    def load(cls, model: "ModelArgs | str", lora_weights: str | None = None, prompt: "PromptArgs | None" = None, *,
             merge: bool = True, **options) -> "Generator":
        """The base `model` (ModelArgs, or a base model's name) with the adapter `lora_weights`, merged into it when
        `merge`, prompted as `prompt` says; what it leaves None is what the adapter (or merged model) records
        (loader.resolve_prompt). ModelArgs' and PromptArgs' fields are also taken as keywords:
        `Generator.load("gemma3-270m", "runs/mine", dtype="fp32", knowledge="none")`."""
        from medlora.config import model_and_prompt
        from medlora.loader import load

        margs, prompt, others = model_and_prompt(model, prompt, options)
        if others:
            raise TypeError(f"Generator.load() got an unexpected keyword argument {next(iter(others))!r}")
        name = "default"
        loaded = load(margs, {name: lora_weights} if lora_weights else {}, prompt, merge)
        name = name if lora_weights else margs.base_model
        return cls(loaded.model, loaded.tokenizer, loaded.templates[name], loaded.knowledge[name])

    @property
    def device(self):
        return next(self.model.parameters()).device

    def lookup(self, instruction: str, input: str = "", history=()) -> "Retrieved | None":
        """The facts retrieved for a question (a follow-up's disease from the earlier user turns of `history`),
        None when knowledge is off."""
        if self.knowledge is None:
            return None
        return self.knowledge.retrieve_turn(instruction, input, history)

    def prepare(self, turn: Turn) -> tuple[str, "Retrieved | None"]:
        """The prompt for `turn` and the facts retrieved for it (None with knowledge off): looked up from the
        question (a follow-up's disease from the earlier user turns), then rendered as training rendered it. The one
        way infer, eval, chat, the server and the web page turn a question into a prompt."""
        found = self.lookup(turn.instruction, turn.input, turn.history)
        return self.build_prompt(turn.instruction, turn.input, turn.history, found, turn.system), found

    def build_prompt(self, instruction: str, input: str = "", history=(), retrieved: "Retrieved | None" = None,
                     system: str | None = None) -> str:
        """The prompt for a question after the earlier (user, assistant) turns of `history`, rendered as training
        rendered it; with knowledge on, the facts `retrieved` for the question (looked up when not given).
        `system`: this conversation's own system text (default: the template's)."""
        retrieved = retrieved or self.lookup(instruction, input, history)
        knowledge = retrieved.text() if retrieved is not None else None
        return self.template.build_prompt(instruction, input, self.tokenizer, history, knowledge, system)

    @cached_property
    def context_length(self) -> int | None:
        """The most tokens (prompt and answer) the model was built for; None when its config does not say."""
        config = self.model.config
        return getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                       "max_position_embeddings", None)

    def prompt_room(self, gen: GenerationArgs) -> int | None:
        """The prompt tokens the context leaves beside `gen.max_new_tokens` (None: the model does not say); a
        `max_new_tokens` that leaves too little is one line."""
        context = self.context_length
        if not context:
            return None
        if context - gen.max_new_tokens < PROMPT_ROOM_MIN:
            raise ConfigError(f"--max_new_tokens {gen.max_new_tokens}: the model reads at most {context} tokens, "
                              f"prompt and answer together; give at most {context - PROMPT_ROOM_MIN}")
        return context - gen.max_new_tokens

    def prompt_ids(self, prompts: list[str], gen: GenerationArgs) -> list[list[int]]:
        """Token ids of `prompts`, each cut to leave room for `gen.max_new_tokens` in the model's context: the oldest
        tokens go (the earliest turns of a long conversation, the start of a huge text), the end (the question and
        the answer cue) stays, with a warning. A prompt past the context would be read by a model that was never
        trained there, and a megabyte of text would take hours to read. `max_new_tokens` itself must leave room."""
        ids = self.tokenizer(prompts, add_special_tokens=self.template.add_special_tokens)["input_ids"]
        room = self.prompt_room(gen)
        if room is None:
            return ids
        too_long = [i for i, row in enumerate(ids) if len(row) > room]
        if too_long:
            logger.warning("%d prompt(s) longer than the %d tokens the context leaves beside %d new tokens (the "
                           "longest: %d): their oldest tokens were left out", len(too_long), room,
                           gen.max_new_tokens, max(len(ids[i]) for i in too_long))
        bos = self.tokenizer.bos_token_id if self.template.add_special_tokens else None
        for i in too_long:  # a BOS the tokenizer put first stays first
            ids[i] = [bos, *ids[i][len(ids[i]) - room + 1:]] if ids[i][0] == bos else ids[i][len(ids[i]) - room:]
        return ids

    def _encode(self, prompts: list[str], gen: GenerationArgs):
        return self.tokenizer.pad({"input_ids": self.prompt_ids(prompts, gen)}, padding=True,
                                  return_tensors="pt").to(self.device)

    def _generate_kwargs(self, gen: GenerationArgs, prompt_width: int) -> dict:
        """generate()'s arguments for prompts left-padded to `prompt_width` tokens."""
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        kwargs = gen.to_generate_kwargs()
        kwargs.update(pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_ids))
        # The penalties count the answer's own tokens only: transformers' built-in repetition penalty also counts
        # the prompt's, which discourages an answer from using the question's terms (a disease, an option's text).
        processors = LogitsProcessorList()
        repetition, frequency, presence = (kwargs.pop(key) for key in
                                           ("repetition_penalty", "frequency_penalty", "presence_penalty"))
        kwargs["repetition_penalty"] = 1.0  # over a model's own generation_config (Qwen's chat models set 1.1)
        if repetition != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(repetition, prompt_ignore_length=prompt_width))
        if frequency or presence:
            processors.append(AnswerCountPenalty(prompt_width, frequency, presence))
        if gen.urgent_threshold and not gen.do_sample and self.urgent_ids:
            processors.append(FirstTokenRegister(prompt_width, self.urgent_ids, gen.urgent_threshold))
        if processors:
            kwargs["logits_processor"] = processors
        if self.template.stop_strings:
            from transformers import StoppingCriteriaList

            # Stop a sequence as soon as it starts a new template section: the rest would be cut anyway.
            kwargs.update(stopping_criteria=StoppingCriteriaList([self._section_stop]))
        return kwargs

    @cached_property
    def _section_stop(self):
        # Built once: given `stop_strings=`, generate() rebuilds this from the whole vocabulary on every call (~1 s
        # for Qwen's 151k tokens), as its cache key holds get_vocab()'s order, which differs from call to call.
        from transformers import StopStringCriteria

        return StopStringCriteria(self.tokenizer, self.template.stop_strings)

    @torch.inference_mode()
    def generate(self, prompts: list[str], gen: GenerationArgs, batch_size: int = 8, progress: bool = False,
                 continuous: bool = True) -> list[Answer]:
        """Answers in the order of `prompts`, longest prompts first, `batch_size` rows at a time. Greedy and sampled
        answers use continuous batching (medlora.batching: a row whose answer ended is refilled at once); beam search,
        or `continuous=False`, runs static batches of prompts of similar length through `generate`. `progress` shows
        a progress bar (stderr) counting answers."""
        from tqdm.auto import tqdm

        ids = self.prompt_ids(prompts, gen)
        order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
        answers: list[Answer | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), unit="answer", disable=not progress or len(prompts) <= batch_size) as bar:
            if continuous and gen.num_beams == 1:
                waiting = iter(order)

                def take(n: int) -> list[Request]:
                    return [Request(ids[i], gen, tag=i) for i in itertools.islice(waiting, n)]

                def finish(done: Finished) -> None:
                    answers[done.request.tag] = self.to_answer(done.tokens, done.seconds)
                    bar.update(1)

                self.refill_loop(batch_size).run(take, finish)
                return answers
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                for index, answer in zip(batch, self._generate_batch([prompts[i] for i in batch], gen)):
                    answers[index] = answer
                bar.update(len(batch))
        return answers

    def refill_loop(self, max_rows: int) -> RefillLoop:
        """The continuous-batching loop over this model, ending answers at its end tokens and stop strings."""
        stop, pad = None, self.tokenizer.pad_token_id
        if self.template.stop_strings:
            width = self._section_stop.maximum_token_len  # what the criterion looks at of each row's end

            def stop(sequences: list[list[int]]) -> list[bool]:
                tails = torch.full((len(sequences), width), pad, dtype=torch.long)
                for i, sequence in enumerate(sequences):
                    tail = sequence[-width:]
                    tails[i, width - len(tail):] = torch.tensor(tail, dtype=torch.long)
                return self._section_stop(tails.to(self.device), None).tolist()
        return RefillLoop(self.model, self.eos_ids, pad, max_rows, stop, self.urgent_ids)

    @cached_property
    def urgent_ids(self) -> list[int]:
        """The tokens an urgent order's first word starts with (vocab.URGENT_OPENERS), for --urgent_threshold."""
        firsts = (self.tokenizer(word, add_special_tokens=False)["input_ids"][:1] for word in URGENT_OPENERS)
        return sorted({ids[0] for ids in firsts if ids})

    def _generate_batch(self, prompts: list[str], gen: GenerationArgs) -> list[Answer]:
        encoded = self._encode(prompts, gen)
        started = time.perf_counter()
        output = self.model.generate(**encoded, **self._generate_kwargs(gen, encoded["input_ids"].shape[1]))
        seconds = (time.perf_counter() - started) / len(prompts)
        new_tokens = output[:, encoded["input_ids"].shape[1]:].tolist()
        return [self.to_answer(tokens, seconds) for tokens in new_tokens]

    def to_answer(self, tokens: list[int], seconds: float, stops: tuple[str, ...] = ()) -> Answer:
        """The answer in a row's generated `tokens`: up to its first end token, cut by the template's cutter (at its
        stop markers and at `stops`), as `pieces` cuts it streamed."""
        ended = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if ended is None else tokens[:ended]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        answer, cut = self.template.cutter().cut(text)
        # A row stopped by a template marker is padded afterwards, and pad may be EOS: that is not an EOS ending.
        by_eos = ended is not None and not cut
        if stops:  # the first of the template's markers and the request's stop strings ends the answer
            answer, cut = self.template.cutter(stops).cut(text)
        return Answer(answer, len(kept) + by_eos, by_eos, seconds, cut)

    def pieces(self, streamer: TextIteratorStreamer, stop_event: threading.Event, stops: tuple[str, ...] = ()
               ) -> Iterator[str]:
        """The text of `streamer`'s tokens in pieces, cut by the template's cutter (at its stop markers and at
        `stops`); reaching one sets `stop_event`."""
        return self.template.cutter(stops).stream(streamer, stop_event.set)

    def stream(self, prompt: str, gen: GenerationArgs, stop_event: threading.Event | None = None,
               stops: tuple[str, ...] = ()) -> Iterator[str]:
        """Text pieces of one answer as they are generated, stripped, cut at the template's stop markers and at
        `stops`; they add up to the text `generate` would return.

        Setting `stop_event` ends generation at the next token (Ctrl-C in chat, a closed page).
        """
        from transformers import StoppingCriteriaList

        stop_event = stop_event or threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        encoded = self._encode([prompt], gen)
        kwargs = dict(**encoded, **self._generate_kwargs(gen, encoded["input_ids"].shape[1]), streamer=streamer)
        kwargs["stopping_criteria"] = StoppingCriteriaList([*kwargs.get("stopping_criteria", []), StopOnEvent(stop_event)])
        errors = []

        def run():
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except Exception as exc:  # surfaced in the caller's thread below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            yield from self.pieces(streamer, stop_event, stops)
        finally:  # also when the caller stops reading early (Ctrl-C, a closed page): finish the thread first
            stop_event.set()
            worker.join()
        if errors:
            raise errors[0]
