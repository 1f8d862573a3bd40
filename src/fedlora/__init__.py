"""fedlora: federated fine-tuning of LLMs with low-rank adapters."""

__version__ = "0.1.0"
