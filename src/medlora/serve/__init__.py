"""Serving a model over HTTP: an OpenAI-compatible API (`api.py`) over one base model and its LoRA adapters.

`Engine` owns the model, its adapters and a single worker thread that batches queued requests; `create_app`
puts the OpenAI routes (`/v1/models`, `/v1/chat/completions`, `/v1/completions`), bounds and errors around it.
`medlora serve` (see `medlora.commands.serve`) runs it with uvicorn; docs/serving.md describes the endpoints.
`webui.py` builds the Gradio page (streaming chat, base vs tuned side by side) for `medlora webui`.
"""

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # hosts that only this machine can reach
