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

What a job makes is many objects too: the 200 source data sets of a CT and
the SEG being built (a few thousand nested data sets) are ~300,000 objects,
and a full collection that fell inside a job walked them for 0.2-0.3 s (every
other job, on the path from the model's end to the results in the PACS).  The
worker runs a job with automatic collection off and collects once the job's
result is sent (:func:`collect_after_job`), while it waits for the next one;
the forked encoder, made during the job, never collects (it lives a second).
"""

from __future__ import annotations

import gc
import logging
import time

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


def collect_after_job() -> float:
    """A full collection between jobs (the job ran with automatic collection off); returns its seconds."""
    start = time.perf_counter()
    unreachable = gc.collect()
    seconds = time.perf_counter() - start
    logger.debug("Collected %d unreachable objects after the job in %.3f s", unreachable, seconds)
    return seconds
