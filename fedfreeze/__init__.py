"""fedfreeze: site-level and federated progressive-freezing fine-tuning of imaging CNNs."""

__version__ = "0.1.0"
