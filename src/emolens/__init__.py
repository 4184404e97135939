"""emolens: mechanistic interpretability of emotion concepts across fine-tuning.

``import emolens`` is light (no torch); the names below load their module on first use:
``emolens.Results`` (a results folder as DataFrames, tensors and figures), ``emolens.finetune``,
``emolens.analyze`` and ``emolens.load_model``. ``emolens.finetune`` is the module of that name,
callable as its ``finetune`` function (so ``emolens.finetune.PRESETS`` works too).
"""

__version__ = "0.1.0"

_LAZY = {
    "Results": ("emolens.results_api", "Results"),
    "finetune": ("emolens.finetune", None),  # the module, callable as its function
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
        loaded = importlib.import_module(module)
        return loaded if attr is None else getattr(loaded, attr)
    raise AttributeError(f"module 'emolens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def _callable_module(module_name: str, function_name: str) -> None:
    """Make the module ``module_name`` callable as its function ``function_name``: the package
    attribute ``emolens.finetune`` is the submodule once anything imports it, so the module
    itself must answer the call ``emolens.finetune(...)``."""
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
