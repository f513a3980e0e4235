"""The one loader of every command that runs a trained model: records (medlora.json, checked by
modeling.RECORD_SCHEMA) → preflight → knowledge and template → tokenizer → base → adapters.

`load(ModelArgs, adapters, PromptArgs)` returns the model with its adapters, the tokenizer, and for the base and each
adapter (by name) the template, system text and knowledge its prompts use, by the one rule `resolve_prompt`: what
PromptArgs names, else what the adapter's (or merged model's) medlora.json records, else the defaults: no knowledge,
med_template (med_knowledge with knowledge), no system text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from medlora.config import ModelArgs, PromptArgs
from medlora.modeling import load_adapter, load_base_model, load_tokenizer, preflight_adapter, read_adapter_meta
from medlora.templates import KNOWLEDGE_TEMPLATE, Template, load_template

if TYPE_CHECKING:
    from medlora.knowledge import KnowledgeIndex

logger = logging.getLogger(__name__)


def read_record(folder) -> dict:
    """The checked medlora.json of an adapter or merged model folder ({} where there is none or no folder)."""
    return read_adapter_meta(folder) if folder else {}


def template_for(prompt_template: str | None, *folders, knowledge: bool = False, system: str | None = None
                 ) -> Template:
    """The explicit template, else the one recorded in an adapter's/merged model's medlora.json, else med_template
    (med_knowledge when `knowledge` is on); its system text is `system`, else the recorded one, else none."""
    template = None
    if prompt_template:
        template = load_template(prompt_template)
    for folder in folders:
        recorded = read_record(folder)
        if template is None and recorded.get("template"):
            template = load_template(recorded["template"])
        if system is None and isinstance(recorded.get("system"), str):
            system = recorded["system"]
    template = template or load_template(KNOWLEDGE_TEMPLATE if knowledge else "med_template")
    template.system = system or ""
    return template


def recorded_knowledge(folder) -> str | None:
    """The knowledge source an adapter's/merged model's medlora.json records (None: trained without)."""
    recorded = read_record(folder).get("knowledge")
    return recorded["source"] if recorded else None


def knowledge_for(spec: str | None, *folders) -> "KnowledgeIndex | None":
    """The knowledge to retrieve from: `spec` (kb, cmekg, both, a file; none or "" for none), else the source
    recorded in the first adapter's/merged model's medlora.json that records one, else none. A recorded source whose
    content changed since training is used with a warning."""
    from medlora.knowledge import KnowledgeIndex

    if spec:
        return None if spec == "none" else KnowledgeIndex.load(spec)
    for folder in folders:
        recorded = read_record(folder).get("knowledge")
        if recorded:
            index = KnowledgeIndex.load(recorded["source"])
            if recorded.get("sha256") not in (None, index.sha256):
                logger.warning("knowledge %r has changed since %s was trained on it (content hash differs)",
                               recorded["source"], folder)
            return index
    return None


def resolve_prompt(prompt: PromptArgs, *folders) -> tuple[Template, "KnowledgeIndex | None"]:
    """The template (with its system text) and the knowledge a model prompts with: each option `prompt` gives, else
    what the first of `folders` (an adapter, a merged model, a base; None skipped) that records it has in its
    medlora.json, else the defaults. The one rule, for every command that runs a model and for training."""
    index = knowledge_for(prompt.knowledge, *folders)
    return template_for(prompt.prompt_template, *folders, knowledge=index is not None, system=prompt.system), index


@dataclass
class Loaded:
    """A model ready to answer, with what each of its names (the base, each adapter) prompts with."""

    model: object
    tokenizer: object
    templates: dict[str, Template] = field(default_factory=dict)
    knowledge: dict[str, "KnowledgeIndex | None"] = field(default_factory=dict)

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def load(margs: ModelArgs, adapters: dict[str, str] | None = None, prompt: PromptArgs | None = None,
         merge: bool = True, padding_side: str = "left") -> Loaded:
    """The base of `margs` with `adapters` ({name: folder}) on it, each (and the base) prompted as `prompt` says, else
    as it records (resolve_prompt). One adapter is merged into the base when `merge` (not for 8-/4-bit bases);
    several stay named PeftModel adapters. A bad adapter, template or knowledge source is refused before any weights
    load."""
    adapters, prompt = dict(adapters or {}), prompt or PromptArgs()
    base = margs.base_model
    for folder in (base, *adapters.values()):  # before anything reads a field of them (the base check below does)
        read_record(folder)
    for path in adapters.values():
        preflight_adapter(path, base, margs.allow_pickle, margs.trust_remote_code)
    folders = {base: [base], **{name: [path, base] for name, path in adapters.items()}}
    resolved = {name: resolve_prompt(prompt, *where) for name, where in folders.items()}
    templates = {name: template for name, (template, _) in resolved.items()}
    indexes = {name: index for name, (_, index) in resolved.items()}
    tokenizer = load_tokenizer(base, padding_side=padding_side, trust_remote_code=margs.trust_remote_code)
    model = load_base_model(base, margs.dtype, margs.load_8bit, margs.load_4bit, margs.trust_remote_code)
    for name, path in adapters.items():
        model = load_adapter(model, path, allow_pickle=margs.allow_pickle, adapter_name=name)
    if merge and len(adapters) == 1 and not (margs.load_8bit or margs.load_4bit):
        model = model.merge_and_unload()
    return Loaded(model, tokenizer, templates, indexes)
