"""ftdist: fine-tune pretrained transformers with one recipe at every scale."""

__version__ = "0.1.0"
