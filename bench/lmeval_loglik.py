"""medlora.loglik against lm-evaluation-harness's own `loglikelihood` on one multiple-choice question (tiny-qwen2,
fp32, CPU): the same token ids, the four option letters' log-probabilities side by side. See docs/benchmarks-medical.md.

lm-eval is not one of medlora's dependencies; install it in a venv of its own, then give its interpreter:

    python3 -m venv /tmp/lmv && /tmp/lmv/bin/pip install torch==2.13.0 lm-eval transformers accelerate
    MEDLORA_HOME=~/.cache/medlora-test python bench/lmeval_loglik.py --lm_eval_python /tmp/lmv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

CONTEXT = "以下是中国医学考试的单项选择题。\n糖尿病的典型症状是\nA. 多饮多尿\nB. 皮疹\nC. 咳嗽\nD. 耳鸣\n答案："

# Run by lm-eval's interpreter: its HFLM on the model folder, its own tokenisation of (context, letter)
LM_EVAL_SIDE = """
import json, sys
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
path, context, out = sys.argv[1], sys.argv[2], sys.argv[3]
lm = HFLM(pretrained=path, batch_size=1, device="cpu", dtype="float32")
requests = [Instance(request_type="loglikelihood", doc={}, arguments=(context, x), idx=i) for i, x in enumerate("ABCD")]
json.dump({"scores": [r[0] for r in lm.loglikelihood(requests)],
           "pairs": [lm._encode_pair(context, x) for x in "ABCD"]}, open(out, "w"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm_eval_python", required=True, help="a Python interpreter that has lm-eval installed")
    args = parser.parse_args()

    from medlora.loglik import continuation_logprobs
    from medlora.modeling import load_base_model, load_tokenizer, resolve_model_path

    folder = resolve_model_path("tiny-qwen2")
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "side.py", Path(tmp) / "out.json"
        script.write_text(LM_EVAL_SIDE, encoding="utf-8")
        subprocess.run([args.lm_eval_python, str(script), str(folder), CONTEXT, str(out)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        theirs = json.loads(out.read_text())
    model, tokenizer = load_base_model("tiny-qwen2", "fp32", device="cpu"), load_tokenizer("tiny-qwen2")
    contexts = [context for context, _ in theirs["pairs"]]
    ours = [s[0] for s in continuation_logprobs(model, contexts, [[letter] for _, letter in theirs["pairs"]],
                                                tokenizer.pad_token_id, batch_size=4)]
    print(json.dumps({"lm_eval": theirs["scores"], "medlora": ours,
                      "max_abs_diff": max(abs(a - b) for a, b in zip(ours, theirs["scores"]))}))


if __name__ == "__main__":
    main()
