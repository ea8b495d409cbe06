"""fl2ora: federated fine-tuning of CLIP that keeps the model calibrated."""

__version__ = "0.1.0"
