"""medlora: LoRA fine-tuning of small causal LMs into a Chinese medical assistant.

Research use only; nothing produced by this toolkit is medical advice.
"""

__version__ = "0.1.0"

DISCLAIMER = "⚠ 仅供研究使用，不构成医疗建议。Research use only; not medical advice — consult a qualified clinician."
