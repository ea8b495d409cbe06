"""Console logging for the processes Flower starts (``flwr-serverapp``, ``flwr-clientapp``)."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_console_logging(level: int = logging.INFO) -> None:
    """Send fl2ora's log records to stderr when nothing else handles them.

    Flower configures only its own ``flwr`` logger in the app processes it starts,
    so fl2ora's INFO records would be lost there. Flower forwards the ServerApp's
    stderr to ``flwr run --stream`` and ``flwr log``, and a SuperNode writes its
    ClientApps' stderr to its own output. When the root logger or the ``fl2ora``
    logger already has a handler (a CLI, pytest), this does nothing.
    """
    package_logger = logging.getLogger("fl2ora")
    if logging.getLogger().handlers or package_logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    package_logger.addHandler(handler)
    package_logger.setLevel(level)
