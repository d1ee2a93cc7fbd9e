"""Log calls on Flower's ``flwr`` logger (its console format), without importing Flower."""

from __future__ import annotations

import logging

LOGGER = logging.getLogger("flwr")


def log(level: int, msg: str, *args: object) -> None:
    """``flwr.common.log``'s signature: a message on the ``flwr`` logger."""
    LOGGER.log(level, msg, *args)
