"""adabudget: adaptive-budget parameter-efficient fine-tuning (AdaLoRA done right).

The public API (``adabudget.api``): ``train``, ``load``, ``records``, ``dashboard``, ``table``;
each imports what it needs when called, so ``import adabudget`` is cheap.
"""

from adabudget.version import __version__  # noqa: F401  (adabudget.__version__)

__all__ = ["train", "load", "records", "dashboard", "table"]


def __getattr__(name: str):
    if name in __all__:
        from adabudget import api

        return getattr(api, name)
    raise AttributeError(f"module 'adabudget' has no attribute {name!r}")
