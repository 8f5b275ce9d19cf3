"""DaskExecutor: task tries on a Dask distributed cluster (``[executor] kind = "dask"``, extra ``[dask]``).

Why Dask: when one machine's cores cannot parse the mail, the CPU-heavy tries (ingestion, and the page
ranges of a big document) go to a trusted cluster instead of a home-made one. The runner stays
callback-driven: ``submit`` returns a ``concurrent.futures.Future`` completed from the distributed
future's done-callback, so no thread waits per task.

Files travel as paths, not bytes: the task receives the path of the PDF in the run's work dir and writes
its text file beside it (``stages/cluster_ingest``). A 25 MB PDF and its text never pass through the
scheduler or this process's memory; the price is that the data dir must be shared storage (NFS, CephFS)
mounted at the same path on the engine's host and on every worker.

Worker deaths. A nanny that kills its worker for memory logs the event ``worker-restart-memory`` (naming
the worker's address) before it sends SIGTERM; each task announces on which worker it started
(``cluster_ingest.run_announced``); this client subscribes to both topics. The scheduler reports a try
whose worker died as ``KilledWorker`` naming the task and the last worker, so that try ends ``too_large``
(PdfTooLargeError, final) when a memory event names that worker, logged after the task started there (a
worker restarted on the same address, as with a fixed ``--worker-port``, is judged afresh at every death), and
WorkerCrashedError (retryable: the runner retries it, try_number increments) otherwise, e.g. a task only
queued behind the bomb. The memory event comes by another connection than the worker's death, so it may
arrive later: a death waits up to ``MEMORY_EVIDENCE_WAIT_S`` for it. The start announcement leaves the worker
at its next flush (every few ms): a task that takes all its memory at once, holding the GIL, can be killed
before that and is judged WorkerCrashedError (tests/test_dask.py: a pause of 0.5 s before a 600 MB allocation
is enough; a PDF's decompression starts later than that). With several threads per worker every
task running beside a bomb is blamed with it: run workers with ``--nthreads 1`` (as the LocalCluster here).
The scheduler must not re-run a try on another worker behind our back (a bomb would kill them all, and a
retry the runner does not count could run twice): ``distributed.scheduler.allowed-failures`` is 0 on the
LocalCluster started here; an external scheduler needs ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0``
in its environment (a warning is logged on connect if it has another value), and the ``pipeline`` package
installed like the workers (it unpickles the tasks). Worker saturation 1.0
(``DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION=1.0``): under load a worker holds only the tasks it runs, so
a death costs no queued task a try (with few tasks the scheduler still sends them all at once).
A try past its task timeout (``workflows.cluster_try_timeout_s``) is failed by the runner but not stopped on the
cluster; its late result is ignored. That is ``timeout`` only when a worker announced the try's start: a try that
no worker started in that time waited at a frozen or unreachable scheduler, or behind busy or paused workers, and
the document is not at fault (``timeout_error``: ClusterUnavailableError, so the run waits). Submissions are
refused the same way while the client's view of the scheduler has not been refreshed for
``[executor] scheduler_silent_s`` (a SIGSTOPped scheduler or a stalled link: its TCP connection stays open, so
nothing else notices).

Every distributed exception is translated here, at the edge: an unreachable scheduler or a lost result is
ClusterUnavailableError (retryable; raised by ``submit``, or as a try's result after its one quick retry, it
breaks the run, which the engine requeues with a backoff, uncounted), and so is a scheduler with no worker; a
dead worker as above. A try cancelled by
``close`` is a cancelled future (the runner puts the run back in the queue). An exception the task itself
raised reaches the runner unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError
from typing import Any

from .config import ExecutorConfig
from .dag import TaskContext
from .errors import ClusterUnavailableError, ConfigurationError, PdfTooLargeError, PipelineError, WorkerCrashedError
from .stages import cluster_ingest

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10.0  # an unreachable scheduler fails the submission after this long
MEMORY_EVIDENCE_WAIT_S = 3.0  # how long a worker's death waits for the nanny's memory event
MEMORY_TOPIC = "worker-restart-memory"  # distributed's nanny (worker_memory.NannyMemoryManager) logs this
RESULT_TIMEOUT_S = 30.0  # fetching a finished try's (small) result; past it the try is lost (retryable)
# the scheduler's HTTP routes (health, metrics) on a free loopback port: with the dashboard off they still took
# port 8787, and a second cluster on the host (another serve's, a test's) met it taken (CI failed on the warning)
SCHEDULER_HTTP = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
STARTED_REMEMBERED = 10_000  # task starts kept to judge deaths by (a death is judged within seconds)


def import_distributed() -> Any:
    """Import ``distributed``, or raise a one-line ConfigurationError naming the extra."""
    try:
        import distributed
    except ImportError as exc:
        raise ConfigurationError("executor.kind = 'dask' needs Dask: "
                                 "pip install 'email-digest-pipeline[dask]'") from exc
    return distributed


def task_key(ctx: TaskContext) -> str:
    """A key unique to this try: a new try is a new task, never a cached result.

    All instances of a task share its name as the key's prefix (one task group), so under load the scheduler
    queues them and hands a worker only what it can run (worker saturation), instead of many a death would cost.
    """
    item = "" if ctx.index is None else f"-item{ctx.index}"
    return f"{ctx.task_id.split('[')[0]}-run{ctx.run_id}{item}-try{ctx.try_number}-{uuid.uuid4().hex[:12]}"


def _allowed_failures(dask_scheduler: Any) -> int:
    """Run on the scheduler: how often it re-runs a task whose worker died."""
    return int(dask_scheduler.allowed_failures)


class DaskExecutor:
    """A distributed Client made on first use (to ``config.scheduler`` or a LocalCluster of its own)."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._client: Any = None
        self._cluster: Any = None
        self._closed = False
        self._connected_once = False  # after the first connection, reconnecting goes on a thread of its own
        self._reconnecting: threading.Thread | None = None
        self._live: dict[str, tuple[Any, Future[Any]]] = {}  # key -> (distributed future, ours)
        self._began: set[str] = set()  # keys in _live whose start a worker announced
        self._key_of: dict[Future[Any], str] = {}  # ours -> its key, for the tries in _live
        self._identity: tuple[Any, float] | None = None  # the scheduler identity last seen, and since when
        self._deaths = threading.Condition()
        # worker address -> when (the scheduler's clock) its nanny last restarted it for memory
        self._memory_kills: dict[str, float] = {}
        # task key -> (worker it started on, when: the scheduler's clock), the recent ones
        self._started: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @property
    def client(self) -> Any:
        """The distributed Client, connecting first if needed; ClusterUnavailableError if that fails.

        The first connection is waited for. Once connected, a client that gave up on its scheduler (gone for
        10 s) is replaced by one connected on a thread of its own, and until it is, this raises at once: the
        caller is the engine's pass that claims runs, and a connect to a scheduler that is down takes
        CONNECT_TIMEOUT_S (a killed scheduler held every claim, runs without PDFs too, 10 s per try).
        """
        with self._lock:
            if self._closed:
                raise ClusterUnavailableError("the Dask executor is shut down")
            if self._client is not None and self._client.status not in ("closing", "closed"):
                return self._client
            if self._client is not None:  # gave up on a scheduler that went away: free its loop and sockets
                _release(self._client)
                self._client = None
            if not self._connected_once:
                self._client = self._connect()
                self._connected_once = True
                return self._client
            if self._reconnecting is None:
                self._reconnecting = threading.Thread(target=self._reconnect, name="dask-reconnect", daemon=True)
                self._reconnecting.start()
        raise ClusterUnavailableError(f"the Dask scheduler at {self.config.scheduler or 'a LocalCluster'} went "
                                      "away; connecting to it again")

    def _reconnect(self) -> None:
        """Connect a new client on this thread; the next ``client`` after it returns finds it (or tries again)."""
        client = None
        try:
            client = self._connect()
        except ClusterUnavailableError as exc:
            log.warning("%s; tried again at the next task", exc)
        except Exception as exc:  # never let this thread die silently
            log.error("connecting to the Dask scheduler again failed: %s: %s", type(exc).__name__, exc)
        with self._lock:
            self._reconnecting = None
            if client is not None and self._closed:  # close() ran meanwhile: this client is nobody's
                _release(client)
            elif client is not None:
                self._client = client

    def submit(self, fn: Any, *args: Any, key: str) -> Future[Any]:
        """Run ``fn(*args)`` on the cluster as task ``key``; the returned future completes from a callback."""
        client = self.client
        ours: Future[Any] = Future()
        try:
            self._require_live_scheduler(client)
            self._require_workers(client)
            theirs = client.submit(cluster_ingest.run_announced, fn, *args, key=key, pure=False)
        except ClusterUnavailableError:
            raise
        except Exception as exc:  # OSError, TimeoutError, a client closed meanwhile (ClosedClientError) ...
            raise ClusterUnavailableError(f"cannot submit to the Dask scheduler: {type(exc).__name__}: "
                                          f"{exc}") from exc
        with self._lock:
            if self._closed:  # close() ran meanwhile and cancelled what it saw: this try is cancelled too
                ours.cancel()
                return ours
            self._live[key] = (theirs, ours)  # holding the distributed future keeps the task wanted
            self._key_of[ours] = key
        theirs.add_done_callback(lambda f: self._done(key, f, ours))
        return ours

    def _require_workers(self, client: Any) -> None:
        """ClusterUnavailableError when the scheduler has no worker: a task sent there would wait until its try
        times out, and end ``timeout`` as if the document were at fault (a scheduler restarted after its workers
        left with it). ``[executor] require_workers = false`` turns it off for a cluster that scales from zero.

        Reads the scheduler's identity the client refreshes on its own thread every couple of seconds, so a
        submission never waits on the network for it (a scheduler host gone can hold a call for 30 s). The
        attribute is distributed's private cache; where it is missing or counts no workers, nothing is judged.
        """
        if not self.config.require_workers:
            return
        identity = getattr(client, "_scheduler_identity", None)
        if not isinstance(identity, dict) or "n_workers" not in identity:
            return
        if not identity["n_workers"]:
            raise ClusterUnavailableError(f"the Dask scheduler at {client.scheduler.address} has no workers")

    def _require_live_scheduler(self, client: Any) -> None:
        """ClusterUnavailableError when the scheduler has not answered the client for ``scheduler_silent_s``.

        The client replaces its cached identity (``_scheduler_identity``, private, as in ``_require_workers``) at
        every answer; the same object seen twice that far apart means no answer came in between. A lower bound:
        the object may be older than its first sighting here.
        """
        identity = getattr(client, "_scheduler_identity", None)
        now = time.monotonic()
        with self._lock:
            if self._identity is None or self._identity[0] is not identity:
                self._identity = (identity, now)
            silent_s = now - self._identity[1]
        if silent_s > self.config.scheduler_silent_s:
            raise ClusterUnavailableError(f"the Dask scheduler at {client.scheduler.address} has not answered "
                                          f"for {silent_s:.0f} s")

    def timeout_error(self, ours: Future[Any], timeout_s: float) -> ClusterUnavailableError | None:
        """The cluster's error for a try of ours that timed out before any worker announced its start; None for a
        try that started (its timeout is the task's) or is not ours. The try is released at the scheduler, so it
        does not run late once the release has reached it; a worker that frees up while the release is still on
        its way may start it all the same (seen once, beside two CPU-bound processes: tests/test_dask.py's
        test_a_try_times_out_as_timeout_only_if_a_worker_started_it), and its result is then thrown away."""
        with self._lock:
            key = self._key_of.get(ours)
            if key is None or key in self._began:
                return None
            theirs, _ = self._live.pop(key)
            del self._key_of[ours]
        # released explicitly: distributed's done callback holds the future too, so dropping ours released nothing
        # and the try ran late (a reviewer's find); a message on the client's loop, never a wait for the scheduler
        theirs.release()
        error = ClusterUnavailableError(f"no Dask worker started the try within {timeout_s:g} s: the scheduler is "
                                        "frozen or unreachable, or every worker is busy or paused")
        _settle(ours, error=error)  # ended: the run's handover need not wait for it
        return error

    def close(self) -> None:
        """Cancel the tries still on the cluster, close the client and the LocalCluster started here."""
        with self._lock:
            self._closed = True
            client, cluster, live = self._client, self._cluster, list(self._live.values())
            self._client = self._cluster = None
            self._live.clear()
            self._began.clear()
            self._key_of.clear()
            reconnecting = self._reconnecting
        for _, ours in live:
            ours.cancel()
        if reconnecting is not None:  # it releases what it connects once it sees the executor closed
            reconnecting.join(CONNECT_TIMEOUT_S + 5)
        for closable in (client, cluster):
            if closable is not None:
                try:
                    closable.close()
                except Exception as exc:  # a cluster already gone; nothing left to release
                    log.warning("closing the Dask %s: %s: %s", type(closable).__name__, type(exc).__name__, exc)

    # -- connection -------------------------------------------------------------------

    def _connect(self) -> Any:
        distributed = import_distributed()
        import dask

        target = self.config.scheduler or "a LocalCluster"
        # a Client whose start fails is "closed" already and its close() does nothing, yet its event loop thread
        # and descriptors live on: make it in two steps, so a failure can stop that loop (once per try to connect)
        client = distributed.Client.__new__(distributed.Client)
        try:
            if not self.config.scheduler and self._cluster is None:
                # worker-saturation 1.0: a worker holds only the task it runs, so a death costs no queued task
                with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                                      "distributed.scheduler.worker-saturation": 1.0}):
                    self._cluster = distributed.LocalCluster(
                        n_workers=self.config.local_workers, threads_per_worker=1, processes=True,
                        memory_limit=f"{self.config.worker_memory_mb}MiB", host="127.0.0.1",
                        dashboard_address=None, scheduler_kwargs=SCHEDULER_HTTP)
            client.__init__(self.config.scheduler or self._cluster, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            _release(client)
            raise ClusterUnavailableError(f"cannot reach the Dask scheduler at {target}: {exc}") from exc
        client.subscribe_topic(MEMORY_TOPIC, self._on_memory_event)
        client.subscribe_topic(cluster_ingest.STARTED_TOPIC, self._on_started_event)
        self._check_allowed_failures(client)
        log.info("Dask executor connected to %s", client.scheduler.address)
        return client

    def _check_allowed_failures(self, client: Any) -> None:
        try:
            allowed = client.run_on_scheduler(_allowed_failures)
        except Exception as exc:  # a scheduler that refuses run_on_scheduler still works; we just cannot check
            log.warning("cannot read the scheduler's allowed-failures: %s: %s", type(exc).__name__, exc)
            return
        if allowed:
            log.warning("the Dask scheduler re-runs a task whose worker died %d time(s): a memory bomb kills "
                        "that many more workers; start it with DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0",
                        allowed)

    def _on_memory_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """Called on the client's event loop for each worker a nanny restarts for memory."""
        address = event[1].get("worker") if isinstance(event[1], dict) else None
        if address:
            log.warning("Dask worker %s was restarted for exceeding its memory limit", address)
            with self._deaths:
                self._memory_kills[address] = float(event[0])
                self._deaths.notify_all()

    def _on_started_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """Called on the client's event loop for each task that starts on a worker."""
        if isinstance(event[1], dict):
            key = str(event[1].get("key"))
            with self._deaths:
                self._started[key] = (str(event[1].get("worker")), float(event[0]))
                while len(self._started) > STARTED_REMEMBERED:
                    self._started.popitem(last=False)
            with self._lock:
                if key in self._live:
                    self._began.add(key)

    # -- completion -------------------------------------------------------------------

    def _done(self, key: str, theirs: Any, ours: Future[Any]) -> None:
        """Complete our future from the distributed one (on distributed's callback thread)."""
        with self._lock:
            closed = self._closed
            self._live.pop(key, None)
            self._began.discard(key)
            self._key_of.pop(ours, None)
        try:
            if theirs.status == "finished":  # bounded: a result whose worker died meanwhile must not stall us
                _settle(ours, result=theirs.result(timeout=RESULT_TIMEOUT_S))
            elif theirs.status == "cancelled":
                if closed:
                    ours.cancel()
                else:
                    _settle(ours, error=ClusterUnavailableError(f"task {key} was cancelled by the cluster"))
            else:
                _settle(ours, error=self.translate(theirs.exception()))
        except Exception as exc:  # the result was lost (its worker died) or the scheduler went away
            _settle(ours, error=self.translate(exc))

    def translate(self, exc: BaseException) -> BaseException:
        """Our error for a failed try: the task's own exception as is, a distributed one typed (module docstring)."""
        if isinstance(exc, PipelineError):
            return exc
        distributed = import_distributed()
        if isinstance(exc, distributed.KilledWorker):
            return self._death_error(str(exc.task), exc.last_worker.address)
        from distributed.comm.core import CommClosedError

        if isinstance(exc, (CommClosedError, OSError, TimeoutError, distributed.client.FutureCancelledError)):
            return ClusterUnavailableError(f"the Dask cluster lost the task: {type(exc).__name__}: {exc}")
        return exc

    def _death_error(self, key: str, address: str) -> PipelineError:
        """PdfTooLargeError if the nanny restarted ``address`` for memory after task ``key`` started there,
        else WorkerCrashedError (waiting up to MEMORY_EVIDENCE_WAIT_S for the nanny's event)."""
        with self._deaths:
            where, since = self._started.get(key, ("", float("inf")))
            memory = where == address and self._deaths.wait_for(
                lambda: self._memory_kills.get(address, float("-inf")) >= since, timeout=MEMORY_EVIDENCE_WAIT_S)
        if memory:
            return PdfTooLargeError(f"the task needed memory over the Dask worker's memory limit: the nanny "
                                    f"restarted worker {address}")
        if not where:  # no start announced: it died before the try ran there, or just after, before its flush
            return WorkerCrashedError(f"Dask worker {address} died before the try announced its start there (not "
                                      "for memory): a worker that cannot unpickle the task, the pipeline package "
                                      "not installed in its environment, dies this way (see its log)")
        return WorkerCrashedError(f"Dask worker {address} died while running the task (not for memory)")


def _release(client: Any) -> None:
    """Close a client that is closed already in name (its scheduler gone, or its start failed), yet whose event loop
    thread and descriptors live on."""
    try:
        client.close()
    except Exception as exc:  # closing what is half gone: nothing more to release that way
        log.debug("closing a gone Dask client: %s: %s", type(exc).__name__, exc)
    runner = getattr(client, "_loop_runner", None)
    if runner is not None:
        runner.stop()


def _settle(ours: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Complete ``ours`` unless it is done already (cancelled by ``close`` meanwhile)."""
    try:
        if error is not None:
            ours.set_exception(error)
        else:
            ours.set_result(result)
    except InvalidStateError:
        pass


def wait_for_workers(executor: DaskExecutor, count: int, timeout_s: float = 60.0) -> None:
    """Block until the cluster has ``count`` workers (ClusterUnavailableError after ``timeout_s``)."""
    try:
        executor.client.wait_for_workers(count, timeout=timeout_s)
    except (OSError, TimeoutError) as exc:
        raise ClusterUnavailableError(f"the Dask cluster has fewer than {count} workers: {exc}") from exc
