"""A run's log, capped: the command writes into a pipe, a thread copies it to the log file.

``[run] max_log_mb`` (default 20) bounds what one run can put on disk. The file grows as the
output arrives (``tail -f`` works) up to the cap; past it, the stream is still read (the command
never blocks on a full pipe) and only its last 75% of the cap is kept in memory. When the command
ends, the file is cut back to its first 25% of the cap, then one line
``[nightlab] log capped ([run] max_log_mb): N bytes cut here, of T`` and the kept tail, starting at
a line boundary, are appended. The summary block, printed last, stays readable; so do the first
lines (the traceback of an early error, the config a run printed).

A background process that keeps the pipe open after the command exited does not hold the
harness: after the command's end the pipe is drained for at most ``drain_s`` seconds, then
closed (the straggler gets SIGPIPE on its next write). A failure to write the file (disk full)
does not stop the reading either: the rest is discarded and the file ends with a note.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections import deque
from pathlib import Path

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
HEAD_FRACTION = 0.25
_CHUNK = 1 << 16


class CappedLog:
    """Use: ``log = CappedLog(path, cap)``; give ``log.write_fd`` to the child as stdout/stderr;
    ``log.start()`` right after spawning; ``log.close()`` once the command has ended."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, *, drain_s: float = 2.0) -> None:
        self.path = Path(path)
        self.max_bytes = max(1024, int(max_bytes))
        self.head_max = int(self.max_bytes * HEAD_FRACTION)
        self.tail_max = self.max_bytes - self.head_max
        self.drain_s = drain_s
        self.total = 0  # bytes the command wrote
        self.cut = 0  # bytes left out of the file
        self.error = ""
        self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 (closed in close())
        self._in_file = 0
        self._tail: deque[bytes] = deque()
        self._tail_len = 0
        self._read_fd, self.write_fd = os.pipe()  # both close-on-exec; Popen dups write_fd onto 1 and 2
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name=f"nightlab-log-{self.path.name}", daemon=True)
        self._closed = False

    def start(self) -> None:
        """Drop our copy of the write end (so EOF comes when the command's side closes) and pump."""
        os.close(self.write_fd)
        self.write_fd = -1
        self._thread.start()

    def close(self) -> None:
        """Drain, stop, and write the capped form of the log. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.write_fd >= 0:  # never started (the spawn failed)
            os.close(self.write_fd)
            self.write_fd = -1
        else:
            self._stop.set()
            self._thread.join()
        with contextlib.suppress(OSError):
            os.close(self._read_fd)
        try:
            if self.total > self.max_bytes and not self.error:
                self._finish_capped()
        except OSError as e:
            self.error = f"{e.strerror or e}"
        finally:
            with contextlib.suppress(OSError):
                if self.error:
                    self._file.write(f"\n[nightlab] log write failed: {self.error}\n".encode())
                self._file.close()

    # ------------------------------------------------------------------ the pump thread

    def _pump(self) -> None:
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        deadline: float | None = None
        while True:
            if self._stop.is_set():
                if deadline is None:
                    deadline = time.monotonic() + self.drain_s
                elif time.monotonic() >= deadline:
                    return
            if not poller.poll(50 if deadline is None else 10):
                if deadline is not None:
                    return  # the command ended and nothing more is waiting
                continue
            try:
                data = os.read(self._read_fd, _CHUNK)
            except OSError:
                return
            if not data:
                return
            self._take(data)

    def _take(self, data: bytes) -> None:
        self.total += len(data)
        if self._in_file < self.max_bytes and not self.error:
            part = data[: self.max_bytes - self._in_file]
            try:
                self._file.write(part)
                self._in_file += len(part)
            except OSError as e:
                self.error = f"{e.strerror or e}"
        self._tail.append(data)
        self._tail_len += len(data)
        while self._tail and self._tail_len - len(self._tail[0]) >= self.tail_max:
            self._tail_len -= len(self._tail.popleft())

    def _finish_capped(self) -> None:
        tail = b"".join(self._tail)[-self.tail_max:]
        nl = tail.find(b"\n", 0, _CHUNK)
        if 0 <= nl < len(tail) - 1:  # start the tail at a line boundary
            tail = tail[nl + 1:]
        self.cut = self.total - self.head_max - len(tail)
        self._file.truncate(self.head_max)
        self._file.seek(self.head_max)
        with open(self.path, "rb") as f:
            f.seek(max(0, self.head_max - 1))
            ends_line = f.read(1) in (b"\n", b"")
        note = (f"[nightlab] log capped ([run] max_log_mb): {self.cut} bytes cut here, of {self.total}; "
                f"the first {self.head_max} and the last {len(tail)} bytes are kept\n")
        self._file.write((b"" if ends_line else b"\n") + note.encode() + tail)
