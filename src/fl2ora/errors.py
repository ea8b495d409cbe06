"""Exceptions shared across fl2ora."""


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says how to fix it."""
