"""Prompt templates in the alpaca-lora/Huatuo JSON format, plus the tokenizer's own chat template.

A template file holds `description`, `prompt_input`, `prompt_no_input` and `response_split`.
`--prompt_template` takes a built-in name (see `BUILTIN_TEMPLATES`) or a path to such a file.

Knowledge (`--knowledge`, docs/knowledge.md): a template with a `{knowledge}` slot (the built-in `med_knowledge`) gets
the retrieved facts there, or its `no_knowledge` text when retrieval found none; a template without the slot gets
them before the instruction, under KNOWLEDGE_HEADER.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field
from pathlib import Path

from medlora.errors import TemplateError
from medlora.io import read_json_object

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent
ALIASES = {"chinese_med": "med_template", "med": "med_template"}
BUILTIN_TEMPLATES = ("med_template", "med_knowledge", "alpaca", "chat")
KNOWLEDGE_TEMPLATE = "med_knowledge"  # what --knowledge uses when no template is named
KNOWLEDGE_HEADER = "参考知识:"  # for templates without a {knowledge} slot
NO_KNOWLEDGE = "（知识库中没有找到相关条目）"
REQUIRED_KEYS = ("prompt_input", "prompt_no_input", "response_split")


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
    _warned_dropped_input: bool = field(default=False, repr=False)

    @property
    def has_knowledge_slot(self) -> bool:
        return "{knowledge}" in self.prompt_no_input

    def build_prompt(self, instruction: str, input: str = "", tokenizer=None, history=(),
                     knowledge: str | None = None) -> str:
        """The prompt text the model sees before its answer.

        `history` is a sequence of earlier (user, assistant) turns, for multi-turn chat. `knowledge` is the retrieved
        facts' text for this (the last) question: "" when retrieval found none, None when knowledge is off.
        """
        if not self.has_knowledge_slot:
            instruction, knowledge = self.knowledge_instruction(instruction, knowledge), None
        if self.use_chat_template:
            return self._build_chat_prompt(instruction, input, tokenizer, history)
        prompt = "".join(self._format(user, "", None) + answer + "\n" for user, answer in history)
        return prompt + self._format(instruction, input, knowledge)

    def knowledge_instruction(self, instruction: str, knowledge: str | None) -> str:
        """For a template without a {knowledge} slot (and for a chat template's last user message): the
        instruction with the facts before it; unchanged when knowledge is off."""
        if knowledge is None:
            return instruction
        return f"{KNOWLEDGE_HEADER}\n{knowledge or self.no_knowledge}\n\n{instruction}"

    def _format(self, instruction: str, input: str, knowledge: str | None) -> str:
        slots = {"knowledge": knowledge or self.no_knowledge} if self.has_knowledge_slot else {}
        if not input:
            return self.prompt_no_input.format(instruction=instruction, **slots)
        if "{input}" not in self.prompt_input:
            # The Huatuo template has no {input} slot: keep the input rather than lose it silently.
            if not self._warned_dropped_input:
                logger.warning(
                    "template %r has no {input} slot; appending each record's input to its instruction", self.name
                )
                self._warned_dropped_input = True
            return self.prompt_input.format(instruction=f"{instruction}\n{input}", **slots)
        return self.prompt_input.format(instruction=instruction, input=input, **slots)

    def _build_chat_prompt(self, instruction, input, tokenizer, history) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "template 'chat' needs a tokenizer with a chat template; this model has none "
                "(use --prompt_template med_template for base models)"
            )
        messages = []
        for user, answer in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        content = f"{instruction}\n{input}" if input else instruction
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def stop_strings(self) -> list[str]:
        """Markers that end an answer: the response split and the template's other section headers.

        A model that keeps going after its answer usually starts a new "### 问题:" block; what follows is not
        part of the answer.
        """
        headers = [line.strip() for line in self.prompt_no_input.splitlines() if line.strip().startswith("###")]
        return list(dict.fromkeys([self.response_split, *headers] if self.response_split else headers))

    def extract_response(self, generated: str) -> str:
        """The answer in freshly generated text: cut at the first stop marker, stripped."""
        for marker in self.stop_strings:
            if marker and marker in generated:
                generated = generated[: generated.index(marker)]
        return generated.strip()

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


SLOTS = ("instruction", "input", "knowledge")
NO_INPUT_SLOTS = ("instruction", "knowledge")


def check_placeholders(text: str, where: str, allowed: tuple[str, ...]) -> None:
    """Refuse a prompt whose `{...}` fields are not bare names among `allowed`, or whose braces do not pair (a
    literal brace is written `{{` or `}}`)."""
    names = ", ".join("{" + name + "}" for name in allowed)
    try:
        fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(text)
                  if field is not None]
    except ValueError as exc:
        raise TemplateError(f"{where}: unbalanced braces ({exc}); write a literal brace as {{{{ or }}}}") from None
    for field, spec, conversion in fields:
        if field not in allowed:
            raise TemplateError(f"{where}: unknown placeholder {{{field}}}; allowed: {names} "
                                f"(a literal brace is {{{{ or }}}})")
        if spec or conversion:
            raise TemplateError(f"{where}: placeholder {{{field}}} has a format spec or conversion; write it bare")


def load_template(name_or_path: str | dict) -> Template:
    """A built-in template by name (or alias), a template JSON file, or a dict saved in medlora.json."""
    if isinstance(name_or_path, dict):
        data = dict(name_or_path)
        return Template(
            name=data.pop("name", "custom"),
            use_chat_template=data.pop("use_chat_template", False),
            **{k: data[k] for k in (*REQUIRED_KEYS, "description", "no_knowledge") if k in data},
        )
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
    for key in REQUIRED_KEYS:
        if not isinstance(data.get(key), str):
            raise TemplateError(f"{path}: field {key!r} must be a string")
    for key in ("prompt_input", "prompt_no_input"):
        check_placeholders(data[key], f"{path}: field {key!r}", SLOTS if key == "prompt_input" else NO_INPUT_SLOTS)
    if "{instruction}" not in data["prompt_no_input"] or "{instruction}" not in data["prompt_input"]:
        raise TemplateError(f"{path}: prompt_input and prompt_no_input must contain {{instruction}}")
    if ("{knowledge}" in data["prompt_no_input"]) != ("{knowledge}" in data["prompt_input"]):
        raise TemplateError(f"{path}: a {{knowledge}} slot must be in both prompt_input and prompt_no_input")
    if not isinstance(data.get("no_knowledge", ""), str):
        raise TemplateError(f"{path}: field 'no_knowledge' must be a string")
    return Template(
        name=path.stem,
        prompt_input=data["prompt_input"],
        prompt_no_input=data["prompt_no_input"],
        response_split=data["response_split"],
        description=data.get("description", ""),
        **({"no_knowledge": data["no_knowledge"]} if data.get("no_knowledge") else {}),
    )
