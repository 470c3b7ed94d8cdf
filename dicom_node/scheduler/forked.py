"""Run part of a job's encoding in a forked child process, beside the rest in the worker.

Encoding a job's result objects is pure-Python work (pydicom and
highdicom) that holds the GIL, so threads cannot share it out; on a machine
with two or more cores a second process can.  :class:`Forked` forks the
worker process: the child inherits the prediction, the source headers and
everything else by copy-on-write (nothing is pickled on the way in), runs one
function (e.g. writing the SEG, or drawing the overlay series) and sends back
its return value or its error through a pipe; on the way it may report
progress (e.g. the overlay images written so far), which the parent takes in
order as it waits for the result.

The child never touches the GPU or the worker's pipe to the node, dies with
its parent (``PR_SET_PDEATHSIG``), and leaves with ``os._exit`` (no atexit
handlers, no flush of the parent's buffers).  Its files are written
atomically (temp file, rename), so a child killed half-way leaves only a
temp file, which the spool cleans at start.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import struct
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from dicom_node.errors import DicomNodeError, ResultError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def cpu_count() -> int:
    """CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _die_with(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the parent still reaps or kills it
    if os.getppid() != parent:  # the parent died before the call took effect
        os._exit(1)


_FRAME = struct.Struct("<Q")  # each message: its pickled length, then the pickle


def _send_frame(fd: int, payload: tuple[Any, ...]) -> None:
    data = pickle.dumps(payload)
    view = memoryview(_FRAME.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


class Forked(Generic[T]):
    """``fn()`` running in a forked child; :meth:`result` waits for it.

    Parameters
    ----------
    fn:
        What the child runs; its return value must pickle.
    what:
        Names the work in error messages ("the SEG's file", ...).
    reports:
        Whether ``fn`` takes a ``report(value)`` argument: each value it
        reports (must pickle) reaches :meth:`result`'s ``progress`` in the
        parent, in order, before the return value.

    Use it as a context manager: leaving the block without :meth:`result`
    (the parent's own part failed) kills the child and reaps it.
    """

    def __init__(self, fn: Callable[..., T], what: str, reports: bool = False) -> None:
        self.what = what
        self._done = False
        parent = os.getpid()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_fd)
            code = 0
            try:
                _die_with(parent)
                try:
                    value = fn(lambda part: _send_frame(write_fd, ("part", part))) if reports else fn()
                    payload: tuple[Any, ...] = ("ok", value)
                except BaseException as exc:  # everything goes back to the parent, which decides
                    payload = ("error", isinstance(exc, DicomNodeError), f"{type(exc).__name__}: {exc}", str(exc))
                _send_frame(write_fd, payload)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(write_fd)
        self.pid = pid
        self._fd = read_fd

    def __enter__(self) -> Forked[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._done:
            self.cancel()

    def result(self, progress: Callable[[Any], None] | None = None) -> T:
        """The child's return value; ``progress`` gets each value the child reported first, in order.

        Raises
        ------
        ResultError
            The child raised a :class:`~dicom_node.errors.DicomNodeError`
            (same message), or ended without an answer (killed, crashed).
        RuntimeError
            The child raised anything else (its type and message).
        """
        payload: tuple[Any, ...] | None = None
        try:
            while (frame := self._read_frame()) is not None:
                if frame[0] == "part":
                    if progress is not None:
                        progress(frame[1])
                    continue
                payload = frame
                break
        finally:
            os.close(self._fd)
            self._done = True
            _, status = os.waitpid(self.pid, 0)
        if payload is None:
            how = (f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exited with status {os.waitstatus_to_exitcode(status)}")
            raise ResultError(f"the process encoding {self.what} {how} without a result")
        if payload[0] == "ok":
            return payload[1]  # type: ignore[no-any-return]
        _, ours, described, message = payload
        if ours:
            raise ResultError(message)
        raise RuntimeError(f"encoding {self.what} raised {described}")

    def _read_frame(self) -> tuple[Any, ...] | None:
        """The child's next message, or ``None`` when it ended (or died) before a whole one."""
        head = self._read_exactly(_FRAME.size)
        if head is None:
            return None
        body = self._read_exactly(_FRAME.unpack(head)[0])
        return None if body is None else pickle.loads(body)  # type: ignore[no-any-return]

    def _read_exactly(self, size: int) -> bytes | None:
        chunks, left = [], size
        while left:
            chunk = os.read(self._fd, min(left, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def cancel(self) -> None:
        """Kill the child and reap it (its result is not wanted)."""
        if self._done:
            return
        self._done = True
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(self._fd)
        os.waitpid(self.pid, 0)


__all__ = ["Forked", "cpu_count"]
