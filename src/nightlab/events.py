"""Engine events: every action the harness takes, as ``(kind, experiment, data)``.

The engine calls :meth:`EventSink.emit` at each step of the flow (session start, proposal,
guard verdict, sandbox command, exit status, measurement, decision, git move, stop). The
audit log subscribes to these; so can anything else that wants a faithful trace. A sink
must not raise for ordinary input, and must be fast: it runs on the loop's thread.

Kinds emitted: ``session.start``, ``session.resume``, ``session.stop``, ``setup.run``,
``researcher.request``, ``researcher.response``, ``candidate``, ``guard``, ``sandbox.start``,
``sandbox.exit``, ``measurement``, ``decision``, ``git.commit``, ``git.advance``, ``recover``,
``requeue``, ``requeue.drop`` and ``requeue.restore`` (a stale candidate's combination queued /
dropped unrun / queued again on ``--resume``),
``policy.violation`` (rule, detail), ``approval.request`` and ``approval.answer`` (``[autonomy]``).
The audit log adds its own ``audit.init``, ``checkpoint`` and ``recover`` records.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol


class EventSink(Protocol):
    def emit(self, kind: str, *, experiment: int | None = None, **data: Any) -> None: ...


class NullSink:
    def emit(self, kind: str, *, experiment: int | None = None, **data: Any) -> None:
        return None


class MemorySink:
    """Keeps events in a list (tests, and a reference for what is emitted)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int | None, dict[str, Any]]] = []

    def emit(self, kind: str, *, experiment: int | None = None, **data: Any) -> None:
        self.events.append((kind, experiment, data))

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.events]


class Locked:
    """Serialises ``emit`` across threads (the engine's slots share one sink)."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self._lock = threading.Lock()

    def emit(self, kind: str, *, experiment: int | None = None, **data: Any) -> None:
        with self._lock:
            self.sink.emit(kind, experiment=experiment, **data)


class FanOut:
    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = list(sinks)

    def emit(self, kind: str, *, experiment: int | None = None, **data: Any) -> None:
        for s in self.sinks:
            s.emit(kind, experiment=experiment, **data)
