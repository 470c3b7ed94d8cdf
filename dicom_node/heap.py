"""What a long-running process of the node does with the objects its start-up made.

Each process of the node (main, receivers, worker) imports its libraries and
builds its state once, then serves for months.  Python's cyclic garbage
collector still walks every one of those start-up objects at each full
collection: 150,000 of them in a receiver (60-70 ms a walk, in the middle of
a C-STORE), 340,000 in a worker with torch, MONAI and highdicom imported
(0.14 s, every two or three jobs, in the middle of one).  None of them can
become cyclic garbage while the process lives, so after start-up they are
moved where the collector no longer looks (:func:`gc.freeze`); what the
process makes afterwards (jobs, associations, models loaded later) is
collected as before.  A forked child (the parallel encoder) inherits the
frozen set, so its collections do not touch, and copy, the parent's pages.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)


def freeze_startup_objects(process: str) -> int:
    """Collect the garbage start-up left, then exempt every object alive now from full collections.

    Call once, at the end of a process's start-up and before it loads
    anything it may later drop (a worker's models: they are loaded after).

    Returns
    -------
    int
        How many objects are exempt now.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("%s: %d start-up objects exempt from full garbage collections", process, frozen)
    return frozen
