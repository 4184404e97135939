"""emolens: mechanistic interpretability of emotion concepts across fine-tuning.

``import emolens`` is light (no torch); the names below load their module on first use:
``emolens.Results`` (a results folder as DataFrames, tensors and figures), ``emolens.finetune``,
``emolens.analyze`` and ``emolens.load_model``.

The subpackages follow the data flow: ``data`` (corpus, labels, prompt, tokens) and ``model``
(loading, checkpoint series, hooks) feed ``measure`` (activations, vectors, steering,
attribution, localisation: what needs a model); ``analysis`` turns measurements into tables
across steps; ``store`` owns the results folder; ``run`` wires a study (fine-tuning, the loop
over checkpoints, study files); ``report`` draws the figures and writes the page.
"""

__version__ = "0.1.0"

_LAZY = {
    "Results": ("emolens.api", "Results"),
    "finetune": ("emolens.run.finetune", "finetune"),
    "analyze": ("emolens.run.analyze", "analyze"),
    "generate": ("emolens.run.generation", "generate"),
    "AnalysisConfig": ("emolens.run.config", "AnalysisConfig"),
    "FinetuneConfig": ("emolens.run.finetune", "FinetuneConfig"),
    "load_model": ("emolens.model.loading", "load_model"),
    "load_corpus": ("emolens.data.corpus", "load_corpus"),
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
