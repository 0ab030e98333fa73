"""lightning-mp's informational messages (a kernel built, a step compiled): one logger, rank zero only."""

from __future__ import annotations

import logging

from lightning.fabric.utilities.rank_zero import rank_zero_only

logger = logging.getLogger("lightning_mp")
logger.setLevel(logging.INFO)
_own = logging.StreamHandler()


def info(message: str) -> None:
    """Log ``message`` once per job (on global rank zero), at INFO, as one line: through the root
    logger where one is configured (``lightning-mp-train``'s, pytest's), else to stderr, as
    Lightning shows its own messages."""
    if rank_zero_only.rank != 0:
        return
    configured = logging.getLogger().hasHandlers()
    logger.propagate = configured
    if configured:
        logger.removeHandler(_own)
    elif _own not in logger.handlers:
        logger.addHandler(_own)
    logger.info(message)
