"""`medlora ARGS` in this process, then one line `RESULT {json}`: exit code, wall seconds, peak GPU memory (MB)."""

import json
import sys
import time

import torch

from medlora.cli import main

start = time.time()
rc = main(sys.argv[1:])
peak = round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None
print("RESULT " + json.dumps({"command": sys.argv[1], "rc": rc, "seconds": round(time.time() - start, 1),
                              "gpu_peak_mb": peak}), flush=True)
