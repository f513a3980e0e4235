"""A real llama.cpp (llama-cpp-python built from its PyPI sdist by `make llamacpp`) loads the demo adapter's GGUF
export and answers the first 20 test records as `medlora infer` does, greedy (bench/llamacpp_agreement.py). Slow:
the export of Gemma-3-270m and 2 x 20 answers take minutes on 2 cores (`make test-slow`)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_llamacpp_answers_as_medlora_infer_does(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from llamacpp_agreement import agreement, default_adapter

    adapter = default_adapter()
    if not (adapter / "adapter_config.json").is_file():
        pytest.skip("no demo adapter: run `make demo` first")
    # fp32: the f16 file's weights are closer to medlora's fp32 run than to its bf16 one (`--dtype auto` on a CPU
    # with bf16), whose rounding alone changes 3 of these 20 greedy answers (docs/usage-after-training.md)
    result = agreement(adapter, n=20, outtypes=("f16",), dtypes=("fp32",), out_dir=tmp_path)
    f16 = result["outtypes"]["f16"]
    assert f16["same_tokens"] == 20  # llama.cpp's tokenizer reads the prompts as transformers does
    assert f16["agree_vs_fp32"] >= 18, f16
