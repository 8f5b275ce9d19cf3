"""Settings of ``serve`` itself: how it lays out its processes, and its Prometheus endpoint.

``pipeline.config`` re-exports both classes; ``Settings`` holds them as ``[serve]`` and ``[metrics]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .addresses import is_loopback
from .errors import ConfigurationError


@dataclass(frozen=True)
class ServeConfig:
    """How ``serve`` lays out its processes (issue 17)."""

    # accept SMTP (spool fsync, run commit, reply) in a child process of its own, so the pipeline's threads
    # never hold the GIL the event loop needs; False: the gateway runs in serve's own process (the baseline)
    gateway_process: bool = True
    # with the gateway in its own process: how many nice steps (0-19, added to serve's own nice value) the
    # engine and its extraction workers run below the gateway, so a busy machine answers senders first; 0: none.
    # Linux only (per-thread nice values).
    # 12, not 5 as before: 5 (weight 335 against the gateway's 1,024) still let the engine take a core from the
    # gateway for tens of ms; at 12 (weight 70) 8 senders' median, mails accepted and p99 beside a 5 MB mail
    # improved in every run, their p99 alone in the three bench runs, not in two audit sessions (README, Benchmarks)
    engine_nice: int = 12
    # the scheduler slice (µs) the gateway process asks Linux for (6.12+; pipeline.priority.request_slice): a
    # short one lets a waking gateway preempt a running engine thread at once; 0: the kernel's (1.4 ms here).
    # Not shown to help: in the audit, whichever slice the default had, the other measured better (README,
    # Benchmarks); the audit measures 100 as short_slice
    gateway_slice_us: int = 0
    # the gateway process says it is alive from its event loop every second; one silent this long (a loop that
    # hangs: a deadlock, a callback that never returns) is killed and restarted, as a dead one is; 0: never
    gateway_hung_after_s: float = 30.0
    # a stop (SIGTERM, Ctrl-C) that takes this long past [engine] shutdown_grace_s ends the process anyway: a run
    # store that does not answer (a frozen PostgreSQL server, a network path that stalls) held serve for as long
    # as it lasted; the runs it held are requeued by the next start's recovery; 0: wait for ever
    stop_margin_s: float = 30.0

    def validate(self) -> None:
        """Reject an engine_nice outside 0-19, a slice Linux would not take, and a negative stop margin."""
        if not 0 <= self.engine_nice <= 19:
            raise ConfigurationError(f"[serve] engine_nice must be 0-19 (nice steps), got {self.engine_nice}")
        if self.gateway_hung_after_s and self.gateway_hung_after_s < 2:  # signs of life come once a second
            raise ConfigurationError("[serve] gateway_hung_after_s must be 0 (never) or 2 s or more, got "
                                     f"{self.gateway_hung_after_s:g}")
        if not 0 <= self.stop_margin_s <= 86_400:
            raise ConfigurationError(f"[serve] stop_margin_s must be 0 (wait for ever) to 86,400 s, got "
                                     f"{self.stop_margin_s:g}")
        if self.gateway_slice_us != 0 and not 100 <= self.gateway_slice_us <= 100_000:
            raise ConfigurationError("[serve] gateway_slice_us must be 0 (the kernel's) or 100-100000 (µs), "
                                     f"got {self.gateway_slice_us}")


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus ``/metrics`` endpoint of serve (``pipeline.metrics``); port 0: off."""

    port: int = 0
    host: str = "127.0.0.1"
    allow_remote: bool = False  # listen on a non-loopback host (``--allow-remote`` sets it, as for SMTP)

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigurationError(f"metrics.port must be a TCP port, 0-65535 (0: no metrics endpoint), "
                                     f"not {self.port}")
        if not is_loopback(self.host) and not self.allow_remote:
            raise ConfigurationError(f"refusing to serve metrics on {self.host}: set metrics.allow_remote = true "
                                     "(or --allow-remote) to expose them beyond this machine")
