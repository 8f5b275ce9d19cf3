"""The engine's heartbeat thread: keep its runs marked alive, and requeue runs whose owner is gone.

``Heartbeat`` is a part of ``WorkflowEngine`` (it shares the engine's lock, active runs and store). Every
``stale_after_s`` it recovers runs of a dead pid on this host, of an owner of this very pid that is not a live
engine (as after a container restart as PID 1), or with a stale heartbeat, so their interrupted tasks are
tried again; a run no longer running under this engine's owner was taken over, and its runner lets it go.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from . import liveness
from . import store as s
from .config import Settings
from .health import LoopHealth
from .passes import Passes
from .runner import DAGRunner
from .store import DAGRunStore, Run

log = logging.getLogger("pipeline.engine")  # the engine's lines: one logger for the operator to watch


class Heartbeat:
    """Keep the engine's runs alive in the store, and recover the runs of owners that are gone."""

    store: DAGRunStore
    settings: Settings
    owner: str
    _cond: threading.Condition
    _stopping: bool
    _active: dict[int, DAGRunner]
    _unsettled: dict[int, str | None]
    _heartbeat_health: LoopHealth
    _heartbeat_passes: Passes
    _note_damage: Callable[[BaseException], None]
    wake: Callable[[], None]

    def recover(self) -> list[int]:
        """Requeue running runs whose owner is gone (dead pid on this host, or a stale heartbeat), and runs in this
        engine's name that it does not run, their heartbeat stale: a claim whose COMMIT reached the store while
        its answer did not (the store's server died in between) left such a run, and nothing ran it until serve
        restarted (a prober's store_server_down: an acked mail without a run end after 240 s)."""
        stale_before = time.time() - self.settings.engine.stale_after_s
        with self._cond:
            ours = set(self._active) | set(self._unsettled)

        def dead(run: Run) -> bool:
            if run.owner == self.owner:
                return run.run_id not in ours and (run.heartbeat_at is None or run.heartbeat_at < stale_before)
            return liveness.is_dead(run, self.owner, stale_before)

        return self.store.recover_runs(dead)

    def _heartbeat_loop(self) -> None:
        cfg = self.settings.engine
        delay, next_recovery = cfg.heartbeat_interval_s, time.monotonic() + cfg.stale_after_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, timeout=delay)
                if self._stopping:
                    return
                ids = list(self._active)
            try:
                with self._heartbeat_passes.passing():
                    self._beat(ids)
                    if time.monotonic() >= next_recovery:  # a dead process's runs, even one that died after start
                        self._recover_now()
                        next_recovery = time.monotonic() + cfg.stale_after_s
            except Exception as exc:  # retried sooner than the interval, so a short outage costs no stale runs
                self._note_damage(exc)
                delay = min(cfg.heartbeat_interval_s, self._heartbeat_health.failed(exc, ids))
            else:
                self._heartbeat_health.succeeded()
                delay = cfg.heartbeat_interval_s

    def _beat(self, ids: list[int]) -> None:
        """Refresh our runs' heartbeats; a run no longer running under our owner was taken over: let it go."""
        if not ids or self.store.heartbeat(ids, owner=self.owner) == len(ids):
            return
        for run_id in ids:
            run = self.store.get_run(run_id)
            with self._cond:
                runner = self._active.get(run_id)
            if runner is not None and (run.state != s.RUNNING or run.owner != self.owner):
                runner.taken_over()  # does nothing if the runner wrote the run's outcome itself meanwhile

    def _recover_now(self) -> None:
        recovered = self.recover()
        if recovered:
            log.warning("requeued %d run(s) left running by a dead process, or by a claim whose answer was lost: "
                        "%s", len(recovered), recovered)
            self.wake()
