"""Logging set-up of the node's processes (the application owns logging, not its modules)."""

from __future__ import annotations

import logging
import sys

# Libraries whose INFO lines are noise for an operator (every association, every copied module).
_QUIET = ("pynetdicom", "apscheduler", "highdicom")


def configure_logging(level: str = "INFO", journald: bool = False, process: str = "") -> None:
    """Log to stdout; without timestamps under journald, which adds its own.

    ``process`` names the process in each line (e.g. ``"worker"``).
    """
    prefix = f"{process} " if process else ""
    fmt = f"%(levelname)s {prefix}%(name)s: %(message)s"
    if not journald:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stdout,
                        force=True)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
