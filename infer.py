"""Seed-compatible shim: `python infer.py --base_model ... --use_lora --lora_weights ... --instruct_dir ...`.

Same as `medlora infer`; accepts the Huatuo flags.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works without `pip install -e .` too

from medlora.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
