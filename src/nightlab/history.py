"""The session's finished experiments as researchers see them (``Context.history``), in bounded memory.

:class:`History` is a read-only ``Sequence[Experiment]`` in the order the experiments finished (a
resumed session's replay: by index). It keeps in memory only what a summary needs, in typed arrays
(ledger id, index, status, metric: 26 bytes per experiment), and the last :data:`RECENT` full rows;
any other row (diff, log tail, evidence, rationale) is read from the ledger when it is asked for --
by position, by slice, or by iteration, in pages of :data:`PAGE` rows. Before, the session kept
every full row in a list (about 5 KB each: issue 13, RSS 74 -> 121 MB over 10,000 experiments).

What a researcher sees is unchanged: every position yields the same :class:`Experiment` the ledger
holds. The prompt builder (:mod:`nightlab.context`) reads its counts and the best metric from
:meth:`History.brief` and fetches only the rows it shows in full.

:meth:`History.view` is a snapshot for one proposal: its length is fixed when it is taken (the arrays
only grow, so the rows it covers never change). Appends come from the scheduler's thread; views are
read from proposer threads.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, overload

import sqlalchemy as sa

from nightlab.types import Experiment, Status

if TYPE_CHECKING:
    from nightlab.ledger import Ledger

RECENT = 128  # full rows kept: the last appended ones (the prompt shows ~48, a stop rule reads the newest)
PAGE = 256  # rows read from the ledger per query when iterating

_STATUSES = list(Status)
_CODE = {s: i for i, s in enumerate(_STATUSES)}


class Brief(NamedTuple):
    """What a summary of one experiment needs (no text): its position in the history, index, status, metric."""

    pos: int
    idx: int
    status: Status
    metric: float | None


class _Store:
    """The arrays and the recent rows, shared by a history and its views."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.ids = array("q")
        self.idx = array("q")
        self.status = array("b")
        self.metric = array("d")
        self.has_metric = array("b")
        self.recent: OrderedDict[int, Experiment] = OrderedDict()  # ledger id -> row
        self.lock = threading.Lock()

    def add(self, exp_id: int, idx: int, status: Status, metric: float | None) -> None:
        # the id array last: a reader sizing itself on it sees the other arrays filled
        self.idx.append(idx)
        self.status.append(_CODE[status])
        self.metric.append(metric if metric is not None else math.nan)
        self.has_metric.append(metric is not None)
        self.ids.append(exp_id)


class History(Sequence[Experiment]):
    """A session's finished experiments; see the module docstring."""

    def __init__(self, ledger: Ledger, *, _store: _Store | None = None, _n: int | None = None) -> None:
        self._s = _store if _store is not None else _Store(ledger)
        self._n = _n  # a view's fixed length; None: the live history

    @classmethod
    def load(cls, ledger: Ledger, session_id: int, since_idx: int = 0) -> History:
        """A session's experiments with ``idx >= since_idx``, by index (the summary columns only)."""
        from nightlab.ledger import experiments

        e = experiments.c
        q = (sa.select(e.id, e.idx, e.status, e.metric)
             .where(e.session_id == session_id, e.idx >= since_idx).order_by(e.idx))
        h = cls(ledger)
        with ledger.transaction() as conn:
            for r in conn.execute(q):
                h._s.add(int(r.id), int(r.idx), Status(r.status), r.metric)
        return h

    @classmethod
    def of(cls, ledger: Ledger, rows: Iterable[Experiment]) -> History:
        """A history of these rows (they must be the ledger's)."""
        h = cls(ledger)
        for e in rows:
            h.append(e)
        return h

    def append(self, exp: Experiment) -> None:
        """Add a finished experiment (the live history only)."""
        if self._n is not None:
            raise TypeError("a view of the history is read-only")
        s = self._s
        with s.lock:
            s.recent[exp.id] = exp
            while len(s.recent) > RECENT:
                s.recent.popitem(last=False)
        s.add(exp.id, exp.idx, exp.status, exp.metric)

    def view(self) -> History:
        """A snapshot: the experiments finished by now."""
        return History(self._s.ledger, _store=self._s, _n=len(self))

    def __len__(self) -> int:
        return self._n if self._n is not None else len(self._s.ids)

    def brief(self, start: int = 0) -> list[Brief]:
        """``(pos, idx, status, metric)`` of every experiment from position ``start``: no ledger read."""
        s, n = self._s, len(self)
        return [Brief(p, s.idx[p], _STATUSES[s.status[p]], s.metric[p] if s.has_metric[p] else None)
                for p in range(start, n)]

    @overload
    def __getitem__(self, i: int) -> Experiment: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[Experiment, ...]: ...

    def __getitem__(self, i: int | slice) -> Experiment | tuple[Experiment, ...]:
        n = len(self)
        if isinstance(i, slice):
            return tuple(self.rows(range(n)[i]))
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("history index out of range")
        return self.rows([i])[0]

    def __iter__(self) -> Iterator[Experiment]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[Experiment]:
        """The experiments from position ``start`` on, read in pages."""
        n = len(self)
        for a in range(max(0, start), n, PAGE):
            yield from self.rows(range(a, min(n, a + PAGE)))

    def __reversed__(self) -> Iterator[Experiment]:
        n = len(self)
        for b in range(n, 0, -PAGE):
            yield from reversed(self.rows(range(max(0, b - PAGE), b)))

    def rows(self, positions: Sequence[int]) -> list[Experiment]:
        """The full rows at these positions: the recent ones from memory, the others from the ledger."""
        s = self._s
        ids = [s.ids[p] for p in positions]
        with s.lock:
            found = {i: s.recent[i] for i in ids if i in s.recent}
        missing = [i for i in ids if i not in found]
        for k in range(0, len(missing), 500):
            for e in s.ledger.experiments_by_id(missing[k:k + 500]):
                found[e.id] = e
        lost = [i for i in ids if i not in found]
        if lost:
            raise LookupError(f"experiments {lost[:5]} are no longer in the ledger")
        return [found[i] for i in ids]


def briefs(history: Sequence[Experiment]) -> list[Brief]:
    """:meth:`History.brief` of any sequence of experiments (a plain tuple: from its rows)."""
    if isinstance(history, History):
        return history.brief()
    return [Brief(p, e.idx, e.status, e.metric) for p, e in enumerate(history)]


def rows_at(history: Sequence[Experiment], positions: Sequence[int]) -> list[Experiment]:
    """The full rows at these positions (a :class:`History` reads the ones it does not hold in one query)."""
    if isinstance(history, History):
        return history.rows(positions)
    return [history[p] for p in positions]
