"""A tiny GGUF checkpoint for tests: a random 2-layer `qwen2` with a small byte-level BPE tokenizer.

It goes through the same transformers GGUF loader as the real Gemma-3-270m file, in well under a second,
so the default test run covers `build_from_gguf` without the minute-long real conversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 64
CONTEXT = 256
EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# A handful of merges over the byte alphabet (GPT-2 spelling: "Ġ" is a space), enough for real BPE at work.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ a", "o n", "Ġ s", "r e", "a t", "e n", "Ġ o", "Ġ c", "Ġ w"]


def byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode, in byte order: the 256 base tokens of a byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    """Tokens and their llama.cpp types (1 normal, 3 control)."""
    tokens = byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    types = [1] * len(tokens)
    for special in (EOS, IM_START, IM_END):
        tokens.append(special)
        types.append(3)
    return tokens, types


def write_standin_gguf(path: Path, seed: int = 0) -> Path:
    """Write the stand-in GGUF (F32 norms and biases, F16 matrices) to `path`; a few hundred KB."""
    import gguf

    tokens, types = vocabulary()
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float16)

    def vec(n: int, around: float = 0.0, scale: float = 0.1) -> np.ndarray:
        return (around + rng.standard_normal(n) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("medlora-standin")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index(EOS))
    writer.add_eos_token_id(tokens.index(EOS))
    writer.add_pad_token_id(tokens.index(EOS))
    writer.add_add_bos_token(False)

    writer.add_tensor("token_embd.weight", mat(vocab, HIDDEN))
    for i in range(LAYERS):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", vec(HIDDEN, 1.0))
        writer.add_tensor(p + "attn_q.weight", mat(HEADS * head_dim, HIDDEN))
        writer.add_tensor(p + "attn_q.bias", vec(HEADS * head_dim))
        writer.add_tensor(p + "attn_k.weight", mat(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(p + "attn_k.bias", vec(KV_HEADS * head_dim))
        writer.add_tensor(p + "attn_v.weight", mat(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(p + "attn_v.bias", vec(KV_HEADS * head_dim))
        writer.add_tensor(p + "attn_output.weight", mat(HIDDEN, HEADS * head_dim))
        writer.add_tensor(p + "ffn_norm.weight", vec(HIDDEN, 1.0))
        writer.add_tensor(p + "ffn_gate.weight", mat(INTERMEDIATE, HIDDEN))
        writer.add_tensor(p + "ffn_up.weight", mat(INTERMEDIATE, HIDDEN))
        writer.add_tensor(p + "ffn_down.weight", mat(HIDDEN, INTERMEDIATE))
    writer.add_tensor("output_norm.weight", vec(HIDDEN, 1.0))
    writer.add_tensor("output.weight", mat(vocab, HIDDEN))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
