"""Seed-compatible shim: `python finetune.py --base_model ... --data_path ... --output_dir ...`.

Same as `medlora finetune`; accepts the alpaca-lora/Huatuo flags.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works without `pip install -e .` too

from medlora.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
