"""emolens: mechanistic interpretability of emotion concepts across fine-tuning.

``import emolens`` is light (no torch); the names below load their module on first use:
``emolens.Results`` (a results folder as DataFrames, tensors and figures), ``emolens.finetune``,
``emolens.analyze`` and ``emolens.load_model``.
"""

__version__ = "0.1.0"

_LAZY = {
    "Results": ("emolens.results_api", "Results"),
    "finetune": ("emolens.finetune", "finetune"),
    "analyze": ("emolens.pipeline", "analyze"),
    "AnalysisConfig": ("emolens.pipeline", "AnalysisConfig"),
    "FinetuneConfig": ("emolens.finetune", "FinetuneConfig"),
    "load_model": ("emolens.models", "load_model"),
    "load_corpus": ("emolens.data", "load_corpus"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'emolens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
