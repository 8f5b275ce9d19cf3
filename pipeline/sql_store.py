"""SqlRunStore: the SQL both run-store backends share (huey's ``BaseSqlStorage``).

The DAGRunStore contract (``pipeline.store``) is written here once, in SQL
with ``?`` placeholders; ``SqliteRunStore`` and ``PostgresRunStore`` add only
what differs: how a connection is had (one behind a lock, or a pool), how a
transaction begins, how a run is inserted (its new id), the row lock a claim
takes, how driver errors map onto the StoreError tree, the queries one
engine answers better its own way (counts), and the dialect of the percentile
query (the task of an instance id, an index hint).

Terminal states are final: the UPDATEs that end or requeue runs and tasks
carry the state they expect in their WHERE clause (compare-and-set), so a late
write (a task's RUNNING after its timeout FAILED) changes nothing. Given an
owner, they also carry ``owner = ?``: a process whose run was taken over
changes nothing.

Its connections and transactions are ``sql_base.SqlBase``, and the purge of
ended runs with the bookkeeping of their spool files ``sql_purge.SqlPurge``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from . import store as s
from .addresses import address_key
from .duration_bins import percentiles_by_task, window_params, window_sql
from .errors import StoreError, UnknownRunError

# these lived here: postgres_store.py and the tests import them from here
from .sql_base import RETRIES, Connection, TransientStoreError, retried  # noqa: F401
from .sql_purge import PURGEABLE, SqlPurge, names_in_use  # noqa: F401
from .store import Run, TaskRun, Transition

RUN_COLUMNS = ("run_id, workflow, state, dedup_key, payload, queued_at, started_at, ended_at, heartbeat_at, owner, "
               "reason")
TASK_COLUMNS = ("run_id, task_id, state, try_number, queued_at, started_at, ended_at, error_type, error_message, "
                "output, wait_s")
# named columns: task_events grew error_type in a later (SQLite) migration
EVENT = "INSERT INTO task_events (run_id, task_id, try_number, state, at"
FINAL_TASK = "state NOT IN ('success', 'failed', 'upstream_failed')"


class SqlRunStore(SqlPurge):
    """The DAGRunStore contract in shared SQL; backends supply connections and the differing pieces."""

    # -- runs -----------------------------------------------------------------

    def create_run(self, workflow: str, payload: Mapping[str, Any], dedup_key: str | None = None,
                   now: float | None = None) -> tuple[Run, bool]:
        return self.create_runs([(workflow, payload, dedup_key)], now)[0]

    @retried
    def create_runs(self, items: Iterable[tuple[str, Mapping[str, Any], str | None]],
                    now: float | None = None) -> list[tuple[Run, bool]]:
        items = list(items)
        results = []
        with self._tx() as conn:
            now = time.time() if now is None else now  # taken under the write lock: ordered with claims
            for workflow, payload, dedup_key in items:
                # look first: an INSERT that hits the key can still use up an id (a gap per duplicate)
                existing = self._find(conn, workflow, dedup_key)
                run_id = None if existing else self._insert_run(conn, workflow, dedup_key, json.dumps(payload), now)
                if run_id is None:  # known, or inserted by a racing process since the look
                    found = existing or self._find(conn, workflow, dedup_key)
                    if found is None:
                        raise StoreError(f"run of {workflow!r} with key {dedup_key!r} vanished while creating it")
                    results.append((found, False))
                    continue
                results.append((Run(run_id, workflow, s.QUEUED, dedup_key, dict(payload), now), True))
            if any(created for _, created in results):
                self._queued(conn)
        return results

    @staticmethod
    def _find(conn: Connection, workflow: str, dedup_key: str | None) -> Run | None:
        if dedup_key is None:
            return None
        row = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE workflow = ? AND dedup_key = ?",
                           (workflow, dedup_key)).fetchone()
        return None if row is None else run_from_row(row)

    def get_run(self, run_id: int) -> Run:
        rows = self._read(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise UnknownRunError(run_id)
        return run_from_row(rows[0])

    def find_run(self, workflow: str, dedup_key: str) -> Run | None:
        rows = self._read(f"SELECT {RUN_COLUMNS} FROM runs WHERE workflow = ? AND dedup_key = ?",
                          (workflow, dedup_key))
        return run_from_row(rows[0]) if rows else None

    def list_runs(self, workflow: str | None = None, state: str | None = None, limit: int = 50,
                  before_run_id: int | None = None) -> list[Run]:
        where, params = filters(workflow=workflow, state=state)
        if before_run_id is not None:
            where.append("run_id < ?")
            params.append(before_run_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(f"SELECT {RUN_COLUMNS} FROM runs {clause} ORDER BY run_id DESC LIMIT ?",
                          [*params, limit])
        return [run_from_row(r) for r in rows]

    def count_runs_by_state(self, workflow: str | None = None) -> dict[str, int]:
        where, params = filters(workflow=workflow)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return {state: int(n) for state, n in self._read(
            f"SELECT state, sum(n) FROM run_counts {clause} GROUP BY state HAVING sum(n) > 0", params)}

    def stale_runs(self, heartbeat_before: float) -> list[Run]:
        rows = self._read(f"SELECT {RUN_COLUMNS} FROM runs WHERE state = 'running' "
                          "AND (heartbeat_at < ? OR heartbeat_at IS NULL) ORDER BY run_id", (heartbeat_before,))
        return [run_from_row(r) for r in rows]

    @retried
    def claim_runs(self, owner: str, limit: int, now: float | None = None,
                   only: Collection[int] | None = None) -> list[Run]:
        if limit < 1:
            raise ValueError(f"claim_runs takes a limit of 1 or more, not {limit}")
        ids = sorted(only) if only is not None else []
        if only is not None and not ids:
            return []
        which = f" AND run_id IN ({', '.join('?' * len(ids))})" if only is not None else ""
        with self._tx() as conn:
            now = time.time() if now is None else now
            rows = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE state = 'queued'{which} "
                                f"ORDER BY run_id LIMIT ?{self.CLAIM_LOCK}", (*ids, limit)).fetchall()
            runs = [run_from_row(row) for row in rows]
            # keep the first start across requeues; never before the queue time (another host's clock may lag)
            claimed = [Run(**{**r.__dict__, "state": s.RUNNING, "heartbeat_at": now, "owner": owner,
                              "started_at": r.started_at if r.started_at is not None else max(now, r.queued_at)})
                       for r in runs]
            if claimed:
                conn.executemany("UPDATE runs SET state = 'running', started_at = ?, heartbeat_at = ?, owner = ? "
                                 "WHERE run_id = ?", [(r.started_at, now, owner, r.run_id) for r in claimed])
        return claimed

    @retried
    def heartbeat(self, run_ids: Iterable[int], now: float | None = None, owner: str | None = None) -> int:
        now = time.time() if now is None else now
        where, extra = owned(owner)
        rows = [(now, r, *extra) for r in run_ids]
        with self._tx(lazy=True) as conn:
            if not rows:
                return 0
            cur = conn.executemany(f"UPDATE runs SET heartbeat_at = ? WHERE run_id = ? AND {where}", rows)
            return max(cur.rowcount, 0)

    @retried
    def finish_run(self, run_id: int, state: str, reason: str | None = None, now: float | None = None,
                   owner: str | None = None) -> int:
        if state not in (s.SUCCESS, s.FAILED):
            raise ValueError(f"finish_run takes success or failed, not {state!r}")
        now = time.time() if now is None else now
        where, extra = owned(owner) if owner is not None else ("state NOT IN ('success', 'failed')", ())
        with self._tx() as conn:
            cur = conn.execute(f"UPDATE runs SET state = ?, reason = ?, ended_at = ? WHERE run_id = ? AND {where}",
                               (state, reason, now, run_id, *extra))
            if cur.rowcount:
                if state == s.FAILED:
                    self._close_tasks(conn, run_id, reason or "failed", now)
                conn.execute(EVENT + ") VALUES (?, '', 0, ?, ?)", (run_id, state, now))
            return int(cur.rowcount)

    @staticmethod
    def _close_tasks(conn: Connection, run_id: int, reason: str, now: float) -> None:
        """End the task rows a failed run leaves open, so ``show`` never lists a task of a finished run as running.

        A runner fails its run only once every task is final; the engine fails a run its runner left mid-task (a
        bookkeeping error past its requeues, a task short of disk that alone does not fit): the task it was on
        takes the run's reason (``internal: …``, ``task_io: …``), and a queued one ends ``upstream_failed``."""
        kind, _, message = reason.partition(": ")
        if not kind.isidentifier():  # a sentence, not a reason code
            kind, message = "internal", reason
        opened = "state IN ('running', 'retrying')"
        conn.execute(EVENT + f", error_type) SELECT run_id, task_id, try_number, 'failed', ?, ? FROM task_runs "
                     f"WHERE run_id = ? AND {opened}", (now, kind, run_id))
        conn.execute(f"UPDATE task_runs SET state = 'failed', ended_at = ?, error_type = ?, error_message = ? "
                     f"WHERE run_id = ? AND {opened}", (now, kind, message or reason, run_id))
        conn.execute(EVENT + ", error_type) SELECT run_id, task_id, try_number, 'upstream_failed', ?, "
                     "'upstream_failed' FROM task_runs WHERE run_id = ? AND state = 'queued'", (now, run_id))
        conn.execute("UPDATE task_runs SET state = 'upstream_failed', ended_at = ?, error_type = 'upstream_failed', "
                     "error_message = ? WHERE run_id = ? AND state = 'queued'",
                     (now, f"not run to its end: the run failed ({reason[:200]})", run_id))

    @retried
    def requeue_run(self, run_id: int, now: float | None = None, owner: str | None = None,
                    note: str | None = None) -> int:
        now = time.time() if now is None else now
        with self._tx() as conn:
            changed = self._requeue(conn, run_id, now, owner, give_back=True, note=note)
            if changed:
                self._queued(conn)
            return changed

    @retried
    def rebuild_run(self, run_id: int, now: float | None = None, owner: str | None = None,
                    note: str | None = None) -> int:
        now = time.time() if now is None else now
        with self._tx() as conn:
            changed = self._requeue(conn, run_id, now, owner, give_back=True, note=note)
            if changed:
                conn.execute("UPDATE task_runs SET state = 'queued', try_number = 0, started_at = NULL, "
                             "ended_at = NULL, error_type = NULL, error_message = NULL, output = NULL "
                             "WHERE run_id = ?", (run_id,))
                conn.execute(EVENT + ") VALUES (?, '', 0, 'rebuilt', ?)", (run_id, now))
                self._queued(conn)
            return changed

    @retried
    def recover_runs(self, is_dead: Callable[[Run], bool], now: float | None = None) -> list[int]:
        now = time.time() if now is None else now
        with self._tx() as conn:
            # locked as read (PostgreSQL): a run another engine claims meanwhile is neither read stale nor requeued
            rows = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE state = 'running'{self.CLAIM_LOCK}").fetchall()
            # a run another recoverer requeued first is not ours to report (its CAS changes nothing here)
            dead = [r.run_id for r in map(run_from_row, rows) if is_dead(r) and
                    self._requeue(conn, r.run_id, now, note=f"requeued: its owner {r.owner} was gone")]
            if dead:
                self._queued(conn)
        return dead

    @staticmethod
    def _requeue(conn: Connection, run_id: int, now: float, owner: str | None = None,
                 give_back: bool = False, note: str | None = None) -> int:
        """Requeue a running run, ``note`` its reason. ``give_back``: its owner requeues it (a stop whose grace
        ended, a broken run handed over), so a try still running was cut short by us, not by the task: its
        number is given back and the next start is that try again, costing no retry (a restart mid-PDF, then one
        worker death, failed a good PDF). A dead owner's runs (``recover_runs``) keep theirs: a task that kills
        the process must use up its tries, or recovery would run it for ever."""
        where, extra = owned(owner)
        cur = conn.execute(f"UPDATE runs SET state = 'queued', owner = NULL, heartbeat_at = NULL, reason = ? "
                           f"WHERE run_id = ? AND {where}", (note and note[:500], run_id, *extra))
        if not cur.rowcount:  # finished, queued or taken over meanwhile: a requeue must not resurrect it
            return 0
        conn.execute(EVENT + ") SELECT run_id, task_id, try_number, 'queued', ? FROM task_runs "
                     "WHERE run_id = ? AND state IN ('running', 'retrying')", (now, run_id))
        if give_back:
            conn.execute("UPDATE task_runs SET try_number = try_number - 1 "
                         "WHERE run_id = ? AND state = 'running' AND try_number > 0", (run_id,))
        conn.execute("UPDATE task_runs SET state = 'queued' WHERE run_id = ? AND state IN ('running', 'retrying')",
                     (run_id,))
        conn.execute(EVENT + ") VALUES (?, '', 0, 'queued', ?)", (run_id, now))
        return 1

    # -- tasks ----------------------------------------------------------------

    def get_tasks(self, run_id: int) -> list[TaskRun]:
        rows = self._read(f"SELECT {TASK_COLUMNS} FROM task_runs WHERE run_id = ? ORDER BY id", (run_id,))
        return [task_from_row(r) for r in rows]

    @retried
    def create_tasks(self, run_id: int, task_ids: Iterable[str], now: float | None = None) -> None:
        now = time.time() if now is None else now
        rows = [(run_id, t, now) for t in task_ids]
        if not rows:
            return
        with self._tx() as conn:
            conn.executemany("INSERT INTO task_runs (run_id, task_id, state, queued_at) VALUES (?, ?, 'queued', ?) "
                             "ON CONFLICT (run_id, task_id) DO NOTHING", rows)
            conn.executemany(EVENT + ") VALUES (?, ?, 0, 'queued', ?)", rows)

    @retried
    def record_transitions(self, transitions: Iterable[Transition], owner: str | None = None) -> int:
        transitions = list(transitions)
        with self._tx(lazy=True) as conn:
            return sum(self._transition(conn, t, owner) for t in transitions)

    def _transition(self, conn: Connection, t: Transition, owner: str | None) -> int:
        """Apply one transition unless its task is final (or, with ``owner``, its run not ours); return 1 if applied."""
        owned_run = "" if owner is None else (
            f" AND EXISTS (SELECT 1 FROM runs WHERE runs.run_id = ? AND state = 'running' AND runs.owner = ?"
            f"{self.OWNER_LOCK})")
        started = t.at if t.state == s.RUNNING else None
        ended = t.at if t.state in s.TERMINAL_TASK_STATES else None
        cur = conn.execute(
            "UPDATE task_runs SET state = ?, try_number = ?, started_at = coalesce(?, started_at), "
            "ended_at = ?, error_type = ?, error_message = ?, output = coalesce(?, output), wait_s = ? "
            f"WHERE run_id = ? AND task_id = ? AND {FINAL_TASK}{owned_run}",
            (t.state, t.try_number, started, ended, t.error_type, t.error_message, t.output_json, t.wait_s,
             t.run_id, t.task_id, *(() if owner is None else (t.run_id, owner))))
        if not cur.rowcount:  # skipped when already final: a late RUNNING must not undo a timeout
            return 0
        conn.execute(EVENT + ", error_type) VALUES (?, ?, ?, ?, ?, ?)",
                     (t.run_id, t.task_id, t.try_number, t.state, t.at, t.error_type))
        return 1

    def task_duration_percentiles(self, since: float, until: float | None = None,
                                  run_time: bool = False) -> dict[str, dict[str, float]]:
        """Read from the duration histograms (``pipeline.duration_bins``): whole hours from their bins, the
        two partial hours from the covering index; rows a day of 1M runs holds are never read one by one."""
        until = time.time() if until is None else until
        sql = window_sql(self.TASK_NAME_SQL, self.WINDOW_INDEX_HINT, run_time)
        return percentiles_by_task(self._read(sql, window_params(since, until, run_time)))

    # -- digests per address ([delivery] max_digests_per_hour) --------------------------

    @retried
    def reserve_digest(self, address: str, digest: str, limit: int, window_s: float,
                       now: float | None = None) -> bool:
        if limit < 1:
            raise ValueError(f"reserve_digest takes a limit of 1 or more, not {limit}")
        address = address_key(address)
        with self._tx() as conn:
            if self.DIGEST_LOCK:
                conn.execute(self.DIGEST_LOCK, (address,))
            now = time.time() if now is None else now  # taken under the lock: ordered with the others
            # rows another purger holds (PostgreSQL) are skipped: they are on their way out already
            conn.execute("DELETE FROM digest_reservations WHERE (address, digest) IN (SELECT address, digest "
                         f"FROM digest_reservations WHERE at <= ?{self.CLAIM_LOCK})", (now - window_s,))
            if conn.execute("SELECT 1 FROM digest_reservations WHERE address = ? AND digest = ?",
                            (address, digest)).fetchone():
                return True
            counted = conn.execute("SELECT count(*) FROM digest_reservations WHERE address = ? AND at > ?",
                                   (address, now - window_s)).fetchone()[0]
            if counted >= limit:
                return False
            conn.execute("INSERT INTO digest_reservations (address, digest, at) VALUES (?, ?, ?)",
                         (address, digest, now))
            return True

    @retried
    def release_digest(self, address: str, digest: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM digest_reservations WHERE address = ? AND digest = ?",
                         (address_key(address), digest))


def owned(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """WHERE condition (and its parameters) for a run that is running, under ``owner`` when given."""
    return ("state = 'running'", ()) if owner is None else ("state = 'running' AND owner = ?", (owner,))


def filters(**columns: Any) -> tuple[list[str], list[Any]]:
    """WHERE conditions (and parameters) for the columns given a value."""
    present = {k: v for k, v in columns.items() if v is not None}
    return [f"{k} = ?" for k in present], list(present.values())


def run_from_row(row: tuple[Any, ...]) -> Run:
    """Map a row of RUN_COLUMNS to a Run (the payload is JSON text in both backends)."""
    return Run(row[0], row[1], row[2], row[3], json.loads(row[4]), *row[5:])


def task_from_row(row: tuple[Any, ...]) -> TaskRun:
    """Map a row of TASK_COLUMNS to a TaskRun."""
    output = json.loads(row[9]) if row[9] is not None else None
    return TaskRun(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], output, row[10])
