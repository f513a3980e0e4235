"""Our prompt template for Ollama: a Modelfile whose TEMPLATE (Go's text/template over `.Messages`) renders a
conversation as `Template.chat_jinja()` does, i.e. as medlora builds the prompt:

- system (or developer) messages, joined by a newline, replace the template's default system text; a system
  text opens the prompt, followed by a newline;
- consecutive messages of one role are joined by a newline;
- each user turn is `prompt_no_input` with its question; an assistant answer follows it, ended by EOS;
- a `{knowledge}` slot gets the template's no-knowledge text: Ollama retrieves no facts.

Literal text is emitted as quoted string constants (JSON escapes are Go escapes too), never as raw template text,
so no whitespace trimming or brace in a template can change it.
"""

from __future__ import annotations

import json

from medlora.templates import Template


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _ask(template: Template, question: str) -> str:
    """prompt_no_input as Go template actions, with `question` (a Go expression) in each {instruction} slot: from
    `Template.question_parts`, the one description the Jinja chat template is derived from too."""
    return "".join("{{- " + (question if part is None else _quoted(part)) + " }}" for part in template.question_parts())


def ollama_template(template: Template, eos_token: str) -> str:
    """Go template for Ollama's TEMPLATE; `eos_token` is the text of the tokenizer's EOS token."""
    eos = "{{- " + _quoted(eos_token) + " }}" if eos_token else ""
    return "\n".join([
        '{{- $system := "" }}{{- $given := false }}',
        '{{- range .Messages }}{{- if or (eq .Role "system") (eq .Role "developer") }}',
        '{{- if $given }}{{- $system = printf "%s\\n%s" $system .Content }}{{- else }}{{- $system = .Content }}'
        '{{- end }}{{- $given = true }}',
        '{{- end }}{{- end }}',
        '{{- if not $given }}{{- $system = ' + _quoted(template.system) + ' }}{{- end }}',
        '{{- if $system }}{{- $system }}{{- "\\n" }}{{- end }}',
        '{{- $user := "" }}{{- $prev := "" }}',
        '{{- range .Messages }}',
        '{{- if eq .Role "user" }}',
        '{{- if eq $prev "assistant" }}' + eos + '{{- end }}',
        '{{- if eq $prev "user" }}{{- $user = printf "%s\\n%s" $user .Content }}{{- else }}{{- $user = .Content }}'
        '{{- end }}',
        '{{- $prev = "user" }}',
        '{{- else if eq .Role "assistant" }}',
        '{{- if eq $prev "user" }}' + _ask(template, "$user") + '{{- .Content }}{{- else }}{{- "\\n" }}{{- .Content }}'
        '{{- end }}',
        '{{- $prev = "assistant" }}',
        '{{- end }}',
        '{{- end }}',
        '{{- if eq $prev "assistant" }}' + eos + '{{- else }}' + _ask(template, "$user") + '{{- end }}',
    ])


def ollama_parameters(decoding: dict) -> dict:
    """Ollama's PARAMETERs for a model's recorded decoding (modeling.recorded_decoding; medlora's recommended one,
    config.RECOMMENDED_DECODING, when nothing is recorded): greedy is temperature 0, as in Ollama."""
    from dataclasses import fields

    from medlora.config import RECOMMENDED_DECODING, GenerationArgs

    names = {f.name for f in fields(GenerationArgs)}
    gen = GenerationArgs(**{k: v for k, v in (decoding or RECOMMENDED_DECODING).items() if k in names})
    return {"temperature": gen.temperature if gen.do_sample else 0, "top_p": gen.top_p, "top_k": gen.top_k,
            "num_predict": gen.max_new_tokens, "repeat_penalty": gen.repetition_penalty,
            "frequency_penalty": gen.frequency_penalty, "presence_penalty": gen.presence_penalty}


def modelfile(gguf_name: str, template: Template, eos_token: str, notes: list[str] = (), decoding: dict | None = None
              ) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` lying beside it, answering with `decoding` (the model's
    recorded decoding; medlora's recommended one when None)."""
    out = ["# Ollama Modelfile written by `medlora export` (it was not run in Ollama where medlora is developed).",
           "# Research use only; not medical advice. 仅供研究使用，不构成医疗建议。",
           *(f"# note: {note}" for note in notes),
           f"FROM ./{gguf_name}"]
    if template.use_chat_template:
        out.append("# the model's own chat template (tokenizer.chat_template in the GGUF) formats the prompt")
    else:
        text = ollama_template(template, eos_token)
        if '"""' in text:  # cannot come from quoted literals; refuse rather than write a broken file
            raise ValueError("the Ollama template would hold three double quotes in a row")
        out.append(f'TEMPLATE """{text}"""')
    for stop in template.stop_strings:
        if stop and '"' not in stop and "\n" not in stop:
            out.append(f'PARAMETER stop "{stop}"')
    out += ["# the decoding the model was made to answer with (its generation_config.json; top_p/top_k matter once",
            "# temperature > 0). Ollama applies the frequency and presence penalties over its window of recent tokens,",
            "# repeat_last_n, where medlora counts exactly the answer's tokens"]
    out += [f"PARAMETER {name} {value}" for name, value in ollama_parameters(decoding).items()]
    return "\n".join(out) + "\n"
