"""fedadapt: federated fine-tuning of adapters, exact where others approximate."""

__version__ = "0.1.0"
