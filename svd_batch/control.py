"""The run's control actor: what the driver and the workers of one run tell each other.

One small actor per run, on the driver's node (an actor elsewhere would die with its node
and take the run with it). It holds
- the drain flag: set by the driver, read by workers before each batch and by plan tasks;
- what planning counted so far (planning.py): the driver's totals, without a row in it, and
  how far planning is ahead of the rows the driver got back, which planning keeps bounded;
- the rows each worker is rendering, per call slot (a worker runs two calls at once, see
  RayWorker), and which call holds its device: a worker that starts a call from a new
  process must have been restarted, so its calls still open died with it. The one on the
  device is charged the death (all of them, if none was), per row, which is how a row that
  kills its worker every time is found and isolated while the other slot's rows are not
  blamed, and how `attempt` is the true attempt number;
- rows that outlived `workers.row_timeout_s`, and the results of rows finished while a
  worker re-renders a troubled batch one row at a time, so a later death loses none of them;
- with shards, the rows each worker holds in its open shard, and the rows of the shards it
  committed, until the driver takes them (a worker's last shard is committed after the stream);
- each worker process's device figures (device.py), for the run record.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class History:
    """What happened to one row in this run so far."""

    deaths: int = 0  # workers that died while rendering it
    timed_out: bool = False
    row: dict[str, Any] | None = None  # its result, when made while isolating a batch


@dataclass
class JobControl:
    draining: bool = False
    # (worker, slot) -> (pid, keys)
    open_calls: dict[tuple[str, int], tuple[int, list[str]]] = field(default_factory=dict)
    history: dict[str, History] = field(default_factory=dict)
    plan: Counter[str] = field(default_factory=Counter)  # videos, skipped, left, handed (on to workers)
    returned: int = 0  # rows the driver got back from the workers (or that wait in a worker's open shard)
    holding: dict[str, int] = field(default_factory=dict)  # worker -> rows in its open shard
    committed: list[dict[str, Any]] = field(default_factory=list)  # rows of committed shards, for the driver
    lost_in_shards: int = 0
    devices: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)  # (worker, pid) -> figures
    holder: dict[str, tuple[int, int]] = field(default_factory=dict)  # worker -> (pid, slot) last on its device

    @staticmethod
    def name(run_id: str) -> str:
        return f"svd-batch-control-{run_id}"

    def drain(self) -> None:
        self.draining = True

    def planned(self, counts: dict[str, int]) -> tuple[bool, int]:
        """A plan task's counts since its last report; the answer: (draining?, items handed on
        and not back yet)."""
        self.plan.update(counts)
        return self.draining, self.plan["handed"] - self.returned

    def got_back(self, rows: int) -> None:
        self.returned += rows

    def shard_rows(self, worker: str, holding: int, committed: list[dict[str, Any]], restarted: bool = False) -> bool:
        """A worker's shards: the rows in its open one, and the rows of those it committed.

        Rows in an open shard count as returned for planning's window, and stay counted when a
        restarted worker says its open shard died with its last process: they never come back.
        A committed row counts as made, should its batch be rendered again after a death."""
        before = self.holding.get(worker, 0)
        if restarted:
            self.lost_in_shards, before = self.lost_in_shards + before, 0
        self.returned += len(committed) + holding - before
        self.holding[worker] = holding
        self.committed += committed
        for row in committed:
            self.history.setdefault(row["key"], History()).row = row
        return True  # taken: the worker need not return the rows itself

    def take_committed(self) -> tuple[list[dict[str, Any]], int, int]:
        """The rows of shards committed since the last call, the rows in open shards, and the
        rows lost with an open shard so far."""
        rows, self.committed = self.committed, []
        return rows, sum(self.holding.values()), self.lost_in_shards

    def plan_counts(self) -> dict[str, int]:
        return dict(self.plan)

    def begin(
        self, worker: str, pid: int, keys: list[str], alone: bool = False, slot: int = 0
    ) -> tuple[bool, dict[str, History]]:
        """A worker starts a call on `keys` in one of its slots: (draining?, the history of the
        batch's rows).

        A batch with history is not rendered whole but one row per call (each `alone`), so
        only those calls are open: a death before the first of them renders nothing, and
        counting it would charge every batch-mate with a death that was not theirs.
        """
        self._count_deaths(worker, pid, slot)
        history = {k: self.history[k] for k in keys if k in self.history}
        if not self.draining and (alone or not history):
            self.open_calls[(worker, slot)] = (pid, keys)
        return self.draining, history

    def _count_deaths(self, worker: str, pid: int, slot: int) -> None:
        """The calls that died are charged: only the one that held the device when it did (what
        kills a worker is its render), or all of them when none did."""
        dead = [
            call
            for call, (opened_by, _) in self.open_calls.items()
            if call[0] == worker and (opened_by != pid or call[1] == slot)
        ]
        held = [call for call in dead if self.holder.get(worker) == (self.open_calls[call][0], call[1])]
        for call in dead:
            keys = self.open_calls.pop(call)[1]
            if call in (held or dead):
                for key in keys:
                    self.history.setdefault(key, History()).deaths += 1

    def device_taken(self, worker: str, pid: int, slot: int = 0) -> None:
        """A call of this worker holds its device now."""
        self.holder[worker] = (pid, slot)

    def on_device(self) -> list[tuple[int, list[str]]]:
        """(pid, keys) of the open calls that hold their worker's device."""
        return [
            (pid, keys)
            for (worker, slot), (pid, keys) in self.open_calls.items()
            if self.holder.get(worker) == (pid, slot)
        ]

    def end(self, worker: str, results: dict[str, dict[str, Any]] | None = None, slot: int = 0) -> None:
        """The call returned (or raised); `results` are kept for rows of a troubled batch."""
        self.open_calls.pop((worker, slot), None)
        for key, row in (results or {}).items():
            self.history.setdefault(key, History()).row = row

    def timed_out(self, worker: str, slot: int = 0) -> None:
        """The worker's one-row call outlived the row timeout; the worker ends itself next."""
        _, keys = self.open_calls.pop((worker, slot), (0, []))
        for key in keys:
            self.history.setdefault(key, History()).timed_out = True

    def in_flight(self) -> list[tuple[int, list[str]]]:
        """(pid, keys) of every open call."""
        return list(self.open_calls.values())

    def device(self, worker: str, pid: int, figures: dict[str, float]) -> None:
        """A worker process's device figures so far (device.py): the last report stands."""
        self.devices[(worker, pid)] = figures

    def device_figures(self) -> list[dict[str, float]]:
        return list(self.devices.values())
