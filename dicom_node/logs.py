"""Logging set-up of the node's processes (the application owns logging, not its modules)."""

from __future__ import annotations

import faulthandler
import logging
import sys

# Libraries whose INFO lines are noise for an operator (every association, every copied module).
_QUIET = ("pynetdicom", "apscheduler", "highdicom")


def configure_logging(level: str = "INFO", journald: bool = False, process: str = "") -> None:
    """Log to stdout; without timestamps under journald, which adds its own.

    ``process`` names the process in each line (e.g. ``"worker"``).  A fatal
    signal in native code (SIGSEGV, SIGBUS from a faulty disk under a mapped
    file, SIGFPE, SIGABRT) still leaves a line: Python's faulthandler writes
    it, with every thread's stack, to stderr (the journal under systemd).
    """
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # a stderr without a file descriptor (a test harness)
        logging.getLogger(__name__).debug("faulthandler not enabled: stderr has no file descriptor")
    prefix = f"{process} " if process else ""
    fmt = f"%(levelname)s {prefix}%(name)s: %(message)s"
    if not journald:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stdout,
                        force=True)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # pynetdicom's "standard" event handlers only format its INFO and DEBUG lines (kept quiet above), yet run
    # for every PDU and DIMSE message; a received C-STORE's even copies the whole data set.  Its documented
    # switch leaves them unbound in every association made from now on in this process (it changes logging only).
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
