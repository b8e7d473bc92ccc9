"""The alpaca-operator training image: Stanford Alpaca fine-tuning with DeepSpeed."""

__version__ = "0.1.0"
