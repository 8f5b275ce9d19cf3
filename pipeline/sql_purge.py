"""SqlPurge: the purge of ended runs and the bookkeeping of their spool files, in the SQL both backends share.

Purge deletes ended runs in batches, one transaction each, and leaves a
tombstone for every spool file no run names any more, so housekeeping can
delete the file once the batch is committed. The reads housekeeping needs
(spool names in use or known, tombstones, the last run id, which run ids
exist, since when spool files are tracked) sit beside it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from . import store as s
from .sql_base import Connection, SqlBase, retried

PURGEABLE = "ended_at < ? AND state IN ('success', 'failed')"  # the runs purge deletes: ended, before a cut-off


class SqlPurge(SqlBase):
    """Purge ended runs, and say which spool files runs or tombstones still name."""

    def count_purgeable(self, older_than: float) -> int:
        return int(self._read(f"SELECT count(*) FROM runs WHERE {PURGEABLE}", (older_than,))[0][0])

    def purge_batches(self, older_than: float, batch_size: int = 1000) -> Iterator[s.PurgedBatch]:
        while True:
            with self._tx() as conn:
                ids = [r[0] for r in conn.execute(
                    f"SELECT run_id FROM runs WHERE {PURGEABLE} LIMIT ?{self.CLAIM_LOCK}",
                    (older_than, batch_size)).fetchall()]
                if not ids:
                    return
                marks = ",".join("?" * len(ids))
                names = {r[0] for r in conn.execute(
                    f"SELECT DISTINCT spool_name FROM runs WHERE run_id IN ({marks}) AND spool_name IS NOT NULL",
                    ids).fetchall()}
                conn.execute(f"DELETE FROM task_events WHERE run_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM task_runs WHERE run_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM runs WHERE run_id IN ({marks})", ids)
                dropped = sorted(names - names_in_use(conn, names))
                if dropped:
                    conn.executemany("INSERT INTO spool_tombstones VALUES (?, ?) "
                                     "ON CONFLICT (name) DO UPDATE SET dropped_at = excluded.dropped_at",
                                     [(name, time.time()) for name in dropped])
            yield s.PurgedBatch(tuple(ids), tuple(dropped))  # after the commit: the caller deletes files now

    def spool_names_in_use(self, names: Iterable[str]) -> set[str]:
        try:
            with self._connection() as conn:
                return names_in_use(conn, set(names))
        except self.DRIVER_ERRORS as exc:
            raise self._store_error(exc) from exc

    def spool_names_known(self, names: Iterable[str]) -> set[str]:
        wanted = set(names)
        if not wanted:
            return set()
        marks = ",".join("?" * len(wanted))
        rows = self._read(f"SELECT spool_name FROM runs WHERE spool_name IN ({marks}) "
                          f"UNION SELECT name FROM spool_tombstones WHERE name IN ({marks})", [*wanted, *wanted])
        return {r[0] for r in rows}

    def list_spool_tombstones(self, after: str = "", limit: int = 1000) -> list[str]:
        return [r[0] for r in self._read("SELECT name FROM spool_tombstones WHERE name > ? ORDER BY name LIMIT ?",
                                         (after, limit))]

    @retried
    def drop_spool_tombstones(self, names: Iterable[str]) -> int:
        rows = [(n,) for n in set(names)]
        if not rows:
            return 0
        with self._tx() as conn:
            cur = conn.executemany("DELETE FROM spool_tombstones WHERE name = ?", rows)
            return max(cur.rowcount, 0)

    def last_run_id(self) -> int:
        rows = self._read(self.LAST_RUN_ID_SQL)
        return int(rows[0][0] or 0) if rows else 0

    def existing_run_ids(self, run_ids: Iterable[int]) -> set[int]:
        wanted = [int(i) for i in set(run_ids)]
        if not wanted:
            return set()
        rows = self._read(f"SELECT run_id FROM runs WHERE run_id IN ({','.join('?' * len(wanted))})", wanted)
        return {int(r[0]) for r in rows}

    def spool_tracked_since(self) -> float:
        rows = self._read("SELECT applied_at FROM schema_migrations WHERE version = ?", (self.TOMBSTONES_VERSION,))
        return float(rows[0][0])


def names_in_use(conn: Connection, names: set[str]) -> set[str]:
    """Those of ``names`` some run names (one indexed lookup each; inside the caller's connection)."""
    if not names:
        return set()
    marks = ",".join("?" * len(names))
    return {r[0] for r in conn.execute(f"SELECT DISTINCT spool_name FROM runs WHERE spool_name IN ({marks})",
                                       list(names)).fetchall()}
