"""Prompt templates in the alpaca-lora/Huatuo JSON format, plus the tokenizer's own chat template.

A template file holds `description`, `prompt_input`, `prompt_no_input` and `response_split`.
`--prompt_template` takes a built-in name (see `BUILTIN_TEMPLATES`) or a path to such a file.

Conversations: `render` turns earlier (user, assistant) turns, a system text and the last question into the text
pieces prompt, answer, prompt, answer, ..., prompt (and the last answer when training). Every answer piece ends with
the template's turn end (EOS for the JSON templates; the chat template's own end-of-turn token, e.g. `<|im_end|>`),
so training (medlora.tokenize) and every prompt at inference (infer, eval, chat, serve, webui) come from this one
rendering.

Knowledge (`--knowledge`, docs/knowledge.md): a template with a `{knowledge}` slot (the built-in `med_knowledge`) gets
the retrieved facts there, or its `no_knowledge` text when retrieval found none; a template without the slot gets
them before the instruction, under KNOWLEDGE_HEADER.

Where an answer ends: `Template.cutter()` cuts finished and streamed answers alike at the template's stop markers
(and a request's stop strings): medlora.templates.cutting.
"""

from __future__ import annotations

import functools
import logging
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from medlora.errors import TemplateError
from medlora.io import read_json_object
from medlora.templates.cutting import Cutter

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent
ALIASES = {"chinese_med": "med_template", "med": "med_template"}
BUILTIN_TEMPLATES = ("med_template", "med_knowledge", "alpaca", "chat")
KNOWLEDGE_TEMPLATE = "med_knowledge"  # what --knowledge uses when no template is named
KNOWLEDGE_HEADER = "参考知识:"  # for templates without a {knowledge} slot
NO_KNOWLEDGE = "（知识库中没有找到相关条目）"
REQUIRED_KEYS = ("prompt_input", "prompt_no_input", "response_split")
# Tokens that end an assistant turn in the chat templates of common instruct models (Qwen, Gemma, Llama 3, Phi-3)
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


@dataclass
class Template:
    """One prompt format: how to turn an instruction (and optional input) into a prompt."""

    name: str
    prompt_input: str = ""
    prompt_no_input: str = ""
    response_split: str = ""
    description: str = ""
    use_chat_template: bool = False
    no_knowledge: str = NO_KNOWLEDGE
    system: str = ""  # the default system text (--system, or the adapter's); a record's own one wins
    _warned_dropped_input: bool = field(default=False, repr=False)

    @property
    def has_knowledge_slot(self) -> bool:
        return "knowledge" in slots(self.prompt_no_input)

    @property
    def add_special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens (e.g. Gemma's <bos>) to a prompt: a chat template writes
        its own."""
        return not self.use_chat_template

    def build_prompt(self, instruction: str, input: str = "", tokenizer=None, history=(),
                     knowledge: str | None = None, system: str | None = None) -> str:
        """The prompt text the model sees before its answer: `render`'s pieces joined.

        `history` is a sequence of earlier (user, assistant) turns, for multi-turn chat. `knowledge` is the retrieved
        facts' text for this (the last) question: "" when retrieval found none, None when knowledge is off.
        """
        if self.use_chat_template:  # rendered whole: a template may render earlier turns differently (no prefix rule)
            self._check_chat(tokenizer)
            return tokenizer.apply_chat_template(
                self._messages(history, instruction, input, knowledge, system, tokenizer), tokenize=False,
                add_generation_prompt=True)
        return "".join(self.render(instruction, input, tokenizer, history, knowledge, system))

    def render(self, instruction: str, input: str = "", tokenizer=None, history=(), knowledge: str | None = None,
               system: str | None = None, answer: str | None = None) -> list[str]:
        """Text pieces [prompt, answer, ..., prompt] for `history` and the last question, plus its `answer` when
        given. Each answer piece ends with `turn_end`; what follows a turn end belongs to the next prompt piece."""
        if self.use_chat_template:
            return self._render_chat(instruction, input, tokenizer, history, knowledge, system, answer)
        plain = functools.partial(plain_text, tokenizer=tokenizer)
        instruction, input, knowledge, answer = plain(instruction), plain(input), plain(knowledge), plain(answer)
        if not self.has_knowledge_slot:
            instruction, knowledge = self.knowledge_instruction(instruction, knowledge), None
        end = self.turn_end(tokenizer)
        system = plain(self.system if system is None else system)
        pieces, head = [], f"{system}\n" if system else ""
        for user, reply in history:
            pieces += [head + self._format(plain(user), "", None), plain(reply) + end]
            head = ""
        pieces.append(head + self._format(instruction, input, knowledge))
        return pieces if answer is None else [*pieces, answer + end]

    def turn_end(self, tokenizer) -> str:
        """The text that ends an answer: EOS for the JSON templates (the chat template writes its own)."""
        return (getattr(tokenizer, "eos_token", None) or "") if tokenizer is not None else ""

    def _messages(self, history, instruction, input, knowledge, system, tokenizer=None) -> list[dict]:
        plain = functools.partial(plain_text, tokenizer=tokenizer)
        system = plain(self.system if system is None else system)
        messages = [{"role": "system", "content": system}] if system else []
        for user, reply in history:
            messages += [{"role": "user", "content": plain(user)}, {"role": "assistant", "content": plain(reply)}]
        content = f"{instruction}\n{input}" if input else instruction
        return [*messages, {"role": "user", "content": self.knowledge_instruction(plain(content), plain(knowledge))}]

    def _render_chat(self, instruction, input, tokenizer, history, knowledge, system, answer) -> list[str]:
        """The chat template's text cut into pieces by rendering the conversation one message at a time: each
        rendering must extend the previous one (a template that rewrites earlier turns cannot be cut this way)."""
        self._check_chat(tokenizer)
        messages = self._messages(history, instruction, input, knowledge, system, tokenizer)
        if answer is not None:
            messages.append({"role": "assistant", "content": plain_text(answer, tokenizer)})
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        pieces, done = [], ""
        ends = [t for t in (*END_OF_TURN_TOKENS, tokenizer.eos_token) if t]
        for stop in range(first_user + 1, len(messages) + 1, 2):  # after each user message, after each assistant's
            for upto, prompt in ((stop, True), (stop + 1, False)):
                if upto > len(messages):
                    break
                text = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)
                if not text.startswith(done):
                    raise TemplateError(
                        "this tokenizer's chat template renders earlier turns differently once a later one is added, "
                        "so the conversation cannot be split into turns to train on; use a template without that "
                        "(or --prompt_template med_template)")
                piece = text[len(done):]
                if not prompt:  # the answer ends at its end-of-turn token; the rest opens the next prompt
                    hits = [piece.index(t) + len(t) for t in ends if t in piece]
                    if not hits:
                        raise TemplateError("this tokenizer's chat template writes no end-of-turn token after an "
                                            "assistant message, so the model could not learn where an answer ends")
                    piece = piece[:min(hits)]
                pieces.append(piece)
                done += piece
        return pieces

    def knowledge_instruction(self, instruction: str, knowledge: str | None) -> str:
        """For a template without a {knowledge} slot (and for a chat template's last user message): the
        instruction with the facts before it; unchanged when knowledge is off."""
        if knowledge is None:
            return instruction
        return f"{KNOWLEDGE_HEADER}\n{knowledge or self.no_knowledge}\n\n{instruction}"

    def _format(self, instruction: str, input: str, knowledge: str | None) -> str:
        fill = {"knowledge": knowledge or self.no_knowledge} if self.has_knowledge_slot else {}
        if not input:
            return self.prompt_no_input.format(instruction=instruction, **fill)
        if "input" not in slots(self.prompt_input):
            # The Huatuo template has no {input} slot: keep the input rather than lose it silently.
            if not self._warned_dropped_input:
                logger.warning(
                    "template %r has no {input} slot; appending each record's input to its instruction", self.name
                )
                self._warned_dropped_input = True
            return self.prompt_input.format(instruction=f"{instruction}\n{input}", **fill)
        return self.prompt_input.format(instruction=instruction, input=input, **fill)

    @staticmethod
    def _check_chat(tokenizer) -> None:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "template 'chat' needs a tokenizer with a chat template; this model has none "
                "(use --prompt_template med_template for base models)"
            )

    def chat_jinja(self) -> str:
        """This template as a Jinja chat template (for vLLM's --chat-template, a GGUF's tokenizer.chat_template):
        for the same messages it renders what `build_prompt` gives after the tokenizer's BOS (it writes
        `bos_token` itself, as chat templates do). System/developer messages replace the default system text;
        consecutive messages of one role are joined with a newline, as `medlora serve` joins them. Knowledge is
        retrieved by medlora only: a `{knowledge}` slot shows the no-knowledge text."""
        import json

        if self.use_chat_template:
            raise TemplateError("template 'chat' is the tokenizer's own chat template already")
        ask = " ~ ".join("q" if part is None else json.dumps(part, ensure_ascii=False)
                         for part in self.question_parts())
        return "".join([
            "{#- medlora template " + json.dumps(self.name, ensure_ascii=False) + ": the prompt medlora builds -#}\n",
            "{%- macro ask(q) -%}{{ " + ask + " }}{%- endmacro -%}\n",
            "{%- set ns = namespace(system='', given=false, out='', user='', prev='') -%}\n",
            "{%- for m in messages if m['role'] in ['system', 'developer'] -%}\n",
            "{%- set ns.system = (ns.system ~ '\\n' if ns.given else '') ~ m['content'] -%}{%- set ns.given = true -%}\n",
            "{%- endfor -%}\n",
            "{%- set system = ns.system if ns.given else " + json.dumps(self.system, ensure_ascii=False) + " -%}\n",
            "{{- bos_token if bos_token is defined and bos_token else '' -}}",
            "{{- system ~ '\\n' if system else '' -}}\n",
            "{%- for m in messages if m['role'] in ['user', 'assistant'] -%}\n",
            "{%- if m['role'] == 'user' -%}\n",
            "{%- if ns.prev == 'assistant' -%}{%- set ns.out = ns.out ~ eos_token -%}{%- endif -%}\n",
            "{%- set ns.user = (ns.user ~ '\\n' ~ m['content']) if ns.prev == 'user' else m['content'] -%}\n",
            "{%- elif ns.prev == 'user' -%}{%- set ns.out = ns.out ~ ask(ns.user) ~ m['content'] -%}\n",
            "{%- else -%}{%- set ns.out = ns.out ~ '\\n' ~ m['content'] -%}\n",
            "{%- endif -%}\n",
            "{%- set ns.prev = m['role'] -%}\n",
            "{%- endfor -%}\n",
            "{{- ns.out -}}",
            "{%- if ns.prev == 'assistant' -%}{{- eos_token -}}",
            "{%- elif add_generation_prompt -%}{{- ask(ns.user) -}}{%- endif -%}\n",
        ])

    def question_parts(self) -> list[str | None]:
        """`prompt_no_input` as the pieces a chat template is derived from (here for Jinja; medlora export's Ollama
        template likewise): literal texts, and None at each {instruction} slot. It is parsed as `str.format` reads
        it when `build_prompt` renders, so an escaped `{{instruction}}` stays literal text and a slot given twice is
        filled twice; a {knowledge} slot is the no-knowledge text (only medlora retrieves facts)."""
        parts: list[str | None] = []
        for literal, slot, _, _ in string.Formatter().parse(self.prompt_no_input):
            parts.append(literal)
            if slot not in (None, "instruction", "knowledge"):
                raise TemplateError(f"template {self.name!r}: prompt_no_input has a {{{slot}}} slot that a chat "
                                    f"template cannot fill")
            if slot is not None:
                parts.append(None if slot == "instruction" else self.no_knowledge)
        return [part for part in parts if part != ""]

    @property
    def stop_strings(self) -> list[str]:
        """Markers that end an answer: the response split and the template's other section headers.

        A model that keeps going after its answer usually starts a new "### 问题:" block; what follows is not
        part of the answer.
        """
        headers = [line.strip() for line in self.prompt_no_input.splitlines() if line.strip().startswith("###")]
        return list(dict.fromkeys([self.response_split, *headers] if self.response_split else headers))

    def cutter(self, stops=()) -> Cutter:
        """The cutter of this template's answers: at its stop markers, and at a request's `stops` too."""
        return Cutter(tuple(self.stop_strings)).also(stops)

    def extract_response(self, generated: str) -> str:
        """The answer in freshly generated text: cut at the first stop marker, stripped."""
        return self.cutter().cut(generated)[0]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "prompt_input": self.prompt_input,
            "prompt_no_input": self.prompt_no_input,
            "response_split": self.response_split,
            "use_chat_template": self.use_chat_template,
            **({"no_knowledge": self.no_knowledge} if self.has_knowledge_slot else {}),
        }


ZERO_WIDTH_SPACE = "\u200b"


def plain_text(text: str | None, tokenizer=None) -> str | None:
    """Text from a user, a data file or a knowledge file, made unable to become a control token: each control-token
    string of the tokenizer in it (`<|im_end|>`, `<|endoftext|>`, `<end_of_turn>`, `<eos>`, ...) gets a zero-width
    space after its first character, so it is tokenised as the characters it shows. Only the template writes
    control tokens: a user cannot end a turn, forge a system turn or put an EOS label in the middle of an answer."""
    if not text:
        return text
    pattern = _control_pattern(tokenizer)
    return pattern.sub(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], text) if pattern else text


def _control_pattern(tokenizer) -> re.Pattern | None:
    key = id(tokenizer)
    cached = _CONTROL_PATTERNS.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    strings = set(END_OF_TURN_TOKENS) | {"<|endoftext|>", "<|im_start|>", "<start_of_turn>", "<bos>", "<eos>"}
    if tokenizer is not None:
        strings |= set(getattr(tokenizer, "all_special_tokens", None) or ())
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        strings |= {token.content for token in decoder.values() if getattr(token, "special", False)}
    strings = sorted((s for s in strings if isinstance(s, str) and len(s) > 1), key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, strings))) if strings else None
    _CONTROL_PATTERNS[key] = (tokenizer, pattern)
    return pattern


_CONTROL_PATTERNS: dict[int, tuple] = {}


SLOTS = ("instruction", "input", "knowledge")
NO_INPUT_SLOTS = ("instruction", "knowledge")


@functools.lru_cache(maxsize=64)
def slots(text: str) -> tuple[str, ...]:
    """The `{...}` slots of a prompt, in order, as `str.format` reads them when a prompt is rendered: `{{x}}` is
    literal text, not a slot. The one reading of a prompt's slots (checks, knowledge placement, chat templates)."""
    return tuple(slot for _, slot, _, _ in string.Formatter().parse(text) if slot is not None)


def check_placeholders(text: str, where: str, allowed: tuple[str, ...]) -> None:
    """Refuse a prompt whose `{...}` fields are not bare names among `allowed`, or whose braces do not pair (a
    literal brace is written `{{` or `}}`)."""
    names = ", ".join("{" + name + "}" for name in allowed)
    try:
        fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(text)
                  if field is not None]
    except ValueError as exc:
        raise TemplateError(f"{where}: unbalanced braces ({exc}); write a literal brace as {{{{ or }}}}") from None
    for slot, spec, conversion in fields:
        if slot not in allowed:
            raise TemplateError(f"{where}: unknown placeholder {{{slot}}}; allowed: {names} "
                                f"(a literal brace is {{{{ or }}}})")
        if spec or conversion:
            raise TemplateError(f"{where}: placeholder {{{slot}}} has a format spec or conversion; write it bare")


def load_template(name_or_path: str | dict, where: str | None = None) -> Template:
    """A built-in template by name (or alias), a template JSON file, or a dict saved in medlora.json (`where` names
    it in errors, e.g. "adapter/medlora.json: field 'template'")."""
    if isinstance(name_or_path, dict):
        return template_from_fields(name_or_path, where or "template", recorded=True)
    name = ALIASES.get(name_or_path, name_or_path)
    if name == "chat":
        return Template(name="chat", use_chat_template=True, description="the tokenizer's own chat template")
    path = TEMPLATE_DIR / f"{name}.json" if name in BUILTIN_TEMPLATES else Path(name_or_path)
    if not path.is_file():
        raise TemplateError(
            f"unknown template {name_or_path!r}: not a built-in ({', '.join(BUILTIN_TEMPLATES)}, "
            f"alias chinese_med) and no such file"
        )
    data = read_json_object(path, TemplateError, "a JSON object (a prompt template)")
    return template_from_fields({**data, "name": path.stem}, str(path))


def template_from_fields(data: dict, where: str, recorded: bool = False) -> Template:
    """A Template from a template file's fields, or (`recorded`) from the `template` of medlora.json, which adds
    `name` and `use_chat_template`: every field checked the same way, each problem one TemplateError line naming
    `where` and the field."""
    def field(key: str) -> str:
        return f"{where}: field {key!r}"

    optional = ("description", "no_knowledge", "name") if recorded else ("description", "no_knowledge")
    for key in (*REQUIRED_KEYS, *optional):
        if (key in REQUIRED_KEYS or key in data) and not isinstance(data.get(key), str):
            raise TemplateError(f"{field(key)} must be a string")
    chat = data.get("use_chat_template", False) if recorded else False
    if not isinstance(chat, bool):
        raise TemplateError(f"{field('use_chat_template')} must be true or false")
    if not chat:
        _check_prompts(data, where)
    return Template(name=data.get("name", "custom"), prompt_input=data["prompt_input"],
                    prompt_no_input=data["prompt_no_input"], response_split=data["response_split"],
                    description=data.get("description", ""), use_chat_template=chat,
                    **({"no_knowledge": data["no_knowledge"]} if data.get("no_knowledge") else {}))


def _check_prompts(data: dict, where: str) -> None:
    """The slots of both prompts (as `str.format` reads them), and a response split that can end a prompt."""
    for key in ("prompt_input", "prompt_no_input"):
        check_placeholders(data[key], f"{where}: field {key!r}", SLOTS if key == "prompt_input" else NO_INPUT_SLOTS)
    if "instruction" not in slots(data["prompt_no_input"]) or "instruction" not in slots(data["prompt_input"]):
        raise TemplateError(f"{where}: prompt_input and prompt_no_input must contain {{instruction}}")
    if ("knowledge" in slots(data["prompt_no_input"])) != ("knowledge" in slots(data["prompt_input"])):
        raise TemplateError(f"{where}: a {{knowledge}} slot must be in both prompt_input and prompt_no_input")
    if data["response_split"] and not data["response_split"].strip():
        raise TemplateError(f"{where}: field 'response_split' is only whitespace, which would cut every answer at its "
                            f"first space; give the marker that ends the prompt (or \"\")")
