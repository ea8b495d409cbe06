"""The federated core: client sampling, local updates and aggregation, free of any runtime."""
