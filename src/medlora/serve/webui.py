"""Gradio web page: a streaming chat, and the base and tuned answers to one question side by side.

The side-by-side tab needs the adapter unmerged (`Generator.load(..., merge=False)`): the base answer comes from
the same weights under `model.disable_adapter()`, so the base is loaded once. Every event that runs the model
shares one concurrency slot, so a base answer (adapter switched off) never overlaps a tuned one.
The page binds 127.0.0.1 unless told otherwise, makes no share link and sends no analytics.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at import time

import gradio as gr  # noqa: E402

from medlora import DISCLAIMER  # noqa: E402
from medlora.config import GenerationArgs  # noqa: E402
from medlora.errors import ConfigError  # noqa: E402
from medlora.generate import Generator  # noqa: E402
from medlora.serve import LOOPBACK  # noqa: E402
from medlora.templates import NO_KNOWLEDGE  # noqa: E402
from medlora.turns import Turn  # noqa: E402

logger = logging.getLogger(__name__)

EXAMPLES = [
    "感冒的常见症状是什么？",
    "高血压应该去哪个科室？",
    "糖尿病的典型症状有哪些？",
    "缺铁性贫血常用什么药？",
    "儿童发烧到38.5℃应该怎么处理？",
]
MODEL_SLOT = "model"  # the concurrency id shared by every event that generates


def can_compare(generator: Generator) -> bool:
    """True when the model carries an unmerged adapter that can be switched off for the base answer."""
    return hasattr(generator.model, "disable_adapter") and hasattr(generator.model, "peft_config")


def settings(gen: GenerationArgs, max_new_tokens, temperature, top_p) -> GenerationArgs:
    """The page's sliders over the command-line defaults; temperature 0 means greedy decoding."""
    temperature = float(temperature)
    return dataclasses.replace(gen, max_new_tokens=int(max_new_tokens), do_sample=temperature > 0,
                               temperature=temperature if temperature > 0 else gen.temperature, top_p=float(top_p))


def stream_answer(generator: Generator, prompt: str, gen: GenerationArgs) -> Iterator[str]:
    """The answer so far, after each new piece. Closing this early (Stop, a closed tab) stops generation."""
    stop = threading.Event()
    pieces = generator.stream(prompt, gen, stop_event=stop)
    text = ""
    try:
        for piece in pieces:
            text += piece
            yield text
    finally:
        stop.set()
        for _ in pieces:  # let the generating thread finish before the model serves the next request
            pass


def knowledge_markdown(found) -> str:
    """The facts a prompt was given, shown under the answer ("" when the model has no knowledge)."""
    if found is None:
        return ""
    body = "\n".join(f"- {line}" for line in found.text().splitlines() or [NO_KNOWLEDGE])
    why = f"\n\n匹配 · matched: {found.why()}" if found.matches else ""
    return f"**知识库条目 · knowledge used**\n\n{body}{why}"


def to_messages(history: list[tuple[str, str]]) -> list[dict]:
    messages = []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def build_demo(generator: Generator, gen: GenerationArgs | None = None, title: str = "medlora") -> gr.Blocks:
    """The page: disclaimer, chat tab, side-by-side tab (when the adapter is unmerged), generation settings."""
    gen = gen or GenerationArgs()
    compare = can_compare(generator)

    def chat_turn(question, history, max_new_tokens, temperature, top_p):
        question = (question or "").strip()
        if not question:
            yield "", history, to_messages(history), gr.update()
            return
        prompt, found = generator.prepare(Turn(question, history=tuple(history)))
        answer, facts = "", knowledge_markdown(found)
        for answer in stream_answer(generator, prompt, settings(gen, max_new_tokens, temperature, top_p)):
            yield "", history, to_messages([*history, (question, answer)]), facts
        history = [*history, (question, answer.strip())]
        yield "", history, to_messages(history), facts

    def compare_turn(question, max_new_tokens, temperature, top_p):
        question = (question or "").strip()
        if not question:
            return
        (prompt, found), current = generator.prepare(Turn(question)), settings(gen, max_new_tokens, temperature, top_p)
        tuned, facts = "", knowledge_markdown(found)
        for tuned in stream_answer(generator, prompt, current):
            yield "", tuned, facts
        with generator.model.disable_adapter():
            for base in stream_answer(generator, prompt, current):
                yield base, tuned, facts

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title} · 中文医疗问答")
        gr.Markdown(f"**{DISCLAIMER}**", elem_id="disclaimer")
        with gr.Accordion("生成设置 · generation settings", open=False):
            with gr.Row():
                max_new_tokens = gr.Slider(1, 2048, value=gen.max_new_tokens, step=1, label="max_new_tokens")
                temperature = gr.Slider(0.0, 2.0, value=gen.temperature if gen.do_sample else 0.0, step=0.05,
                                        label="temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=gen.top_p, step=0.05, label="top_p")
        knobs = [max_new_tokens, temperature, top_p]

        with gr.Tab("对话 · chat"):
            history = gr.State([])
            chatbot = gr.Chatbot(label="medlora", height=380, elem_id="chatbot", feedback_options=None)
            with gr.Row():
                question = gr.Textbox(placeholder="输入医学问题，回车发送 · type a medical question",
                                      show_label=False, scale=6, elem_id="question")
                send = gr.Button("发送 · send", variant="primary", scale=1, elem_id="send")
                stop = gr.Button("停止 · stop", scale=1, elem_id="stop")
                clear = gr.Button("清空 · clear", scale=1, elem_id="clear")
            knowledge = gr.Markdown("", elem_id="knowledge")
            gr.Examples(EXAMPLES, inputs=question, label="示例问题 · examples")
            turn = dict(fn=chat_turn, inputs=[question, history, *knobs],
                        outputs=[question, history, chatbot, knowledge], concurrency_limit=1,
                        concurrency_id=MODEL_SLOT)
            events = [send.click(**turn), question.submit(**turn)]
            stop.click(None, cancels=events)
            clear.click(lambda: ([], [], ""), outputs=[history, chatbot, knowledge], cancels=events)

        with gr.Tab("对比 · base vs tuned"):
            if compare:
                compare_question = gr.Textbox(placeholder="同一问题，分别由基础模型和微调模型回答",
                                              show_label=False, elem_id="compare-question")
                compare_button = gr.Button("对比 · compare", variant="primary", elem_id="compare")
                with gr.Row():
                    base_answer = gr.Textbox(label="基础模型 · base model", lines=8, interactive=False,
                                             elem_id="base-answer")
                    tuned_answer = gr.Textbox(label="微调模型 · tuned (base + LoRA)", lines=8, interactive=False,
                                              elem_id="tuned-answer")
                compare_knowledge = gr.Markdown("", elem_id="compare-knowledge")
                gr.Examples(EXAMPLES, inputs=compare_question, label="示例问题 · examples")
                side_by_side = dict(fn=compare_turn, inputs=[compare_question, *knobs],
                                    outputs=[base_answer, tuned_answer, compare_knowledge], concurrency_limit=1,
                                    concurrency_id=MODEL_SLOT)
                compare_button.click(**side_by_side)
                compare_question.submit(**side_by_side)
            else:
                gr.Markdown("Side by side needs an adapter kept unmerged: start `medlora webui` with "
                            "`--lora_weights DIR` (and without `--merge_lora`).")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve until interrupted: no share link, no analytics, no server-side rendering (needs Node)."""
    if host not in LOOPBACK:
        logger.warning("--host %s: the page has no login; anyone who can reach this address can use the model", host)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup requests to itself
    try:
        demo.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, share=False, show_error=True, ssr_mode=False, pwa=False,
            mcp_server=False, enable_monitoring=False, inbrowser=False, quiet=True, prevent_thread_lock=True,
        )
    except OSError as exc:
        reason = str(exc).split(". ")[0]  # gradio's advice that follows names its own launch() arguments
        raise ConfigError(f"cannot serve on {host}:{port} ({reason}); pass another --port") from None
    url_host = f"[{host}]" if ":" in host else host
    logger.info("web page on http://%s:%d (Ctrl-C to stop)", url_host, port)
    try:
        demo.block_thread()
    finally:
        demo.close()
