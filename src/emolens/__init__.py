"""emolens: mechanistic interpretability of emotion concepts across fine-tuning."""

__version__ = "0.1.0"
