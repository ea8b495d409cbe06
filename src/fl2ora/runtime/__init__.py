"""Runtimes that drive the federated core."""
