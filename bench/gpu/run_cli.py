"""`medlora ARGS` in this process, then one line `RESULT {json}`: exit code, wall seconds, peak GPU memory (MB)."""

import json
import sys
import time

from medlora.cli import main
from run import peak_gpu_mb  # bench/run.py (check.sh puts bench/ on PYTHONPATH)

start = time.time()
rc = main(sys.argv[1:])
peak = peak_gpu_mb()
print("RESULT " + json.dumps({"command": sys.argv[1], "rc": rc, "seconds": round(time.time() - start, 1),
                              "gpu_peak_mb": None if peak is None else round(peak)}), flush=True)
