"""adabudget: adaptive-budget parameter-efficient fine-tuning (AdaLoRA done right)."""

__version__ = "0.1.0"
