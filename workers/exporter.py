"""Prometheus exporter for what Flower's ``/metrics`` lacks (the ``metrics`` extra).

Run it as ``dspex-tasks exporter --port 9808`` or ``python -m workers.exporter``.
Flower counts task events it saw itself, in memory; it has no queue depth, no queue age
and nothing about sessions. This exporter reads Redis on every scrape (a custom
collector, no state of its own worth losing, any number of replicas agree):

- ``dspex_queue_length{queue}``: messages waiting, summed over kombu's priority lists
- ``dspex_queue_oldest_age_seconds{queue}``: age of the next message to be consumed
  (0 when empty)
- ``dspex_broker_unacked_messages``: delivered but not acknowledged (with late acks:
  running or reserved), all queues
- ``dspex_sessions``, ``dspex_variables``, ``dspex_programs``, ``dspex_global_programs``:
  current counts; variables and programs are those of live sessions
- ``dspex_sessions_{created,deleted,expired}_total``, ``dspex_expiry_sweeps_total``:
  lifetime counters from the store's stats hash
- ``dspex_expiry_last_sweep_timestamp_seconds``: when a sweep last finished (beat alive?)
- ``dspex_task_outcomes_total{task,state}``: success / failure / retry / revoked, counted
  by the workers (``workers/outcomes.py``)
- ``dspex_task_failures_total{task,code}``: failures by error code (``session_not_found``,
  ``lm_error``...; ``unknown`` for an error that is not a ``DspexError``)
- ``dspex_lm_calls_total{profile}``, ``dspex_lm_tokens_total{profile,kind}`` (prompt,
  completion), ``dspex_lm_rate_limited_total{profile}`` (provider 429s),
  ``dspex_lm_waits_total{profile}`` and ``dspex_lm_wait_seconds_total{profile}`` (calls
  the limiter held back, and for how long), ``dspex_lm_deferred_total{profile}`` (calls
  with no turn within ``max_wait_s``: task retried later),
  ``dspex_lm_cache_hits_total{profile}`` / ``dspex_lm_cache_misses_total{profile}``: per
  LM profile with ``limits`` or ``cache``, counted by the workers (``lm/limits.py``,
  written about once a second)
- ``dspex_exporter_redis_up{role}``: 1 if the scrape could read the broker / the store;
  ``dspex_exporter_scrape_duration_seconds``

Queue age: kombu ``LPUSH``es and workers ``BRPOP``, so the next message is at the right end
of the list (``LINDEX -1``). Kombu messages carry no send time: when a producer sets the
header :data:`SENT_AT_HEADER` (epoch seconds) the age is exact (within clock skew);
otherwise it is the time since this exporter first saw that message at the end of the
list, a lower bound that resets when the exporter restarts.

Cost per scrape: a handful of commands for the queues, plus ``SessionStore.stats()``, which
reads every indexed session's record (pipelined, 1,000 per round trip). The scrape
duration is exported; scrape every 15-60 s.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import orjson
import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dspex_tasks.app import LM_QUEUE, MAINTENANCE_QUEUE, SENT_AT_HEADER, make_celery
from dspex_tasks.errors import ConfigError, StoreUnavailable
from dspex_tasks.lm.limits import read_profile_stats
from dspex_tasks.settings import Settings
from dspex_tasks.store import SessionStore, redis_client_for

__all__ = [
    "DEFAULT_PORT",
    "QUEUES",
    "SENT_AT_HEADER",
    "DspexCollector",
    "build_registry",
    "main",
    "queue_keys",
    "serve",
]

#: 9808: free in the Prometheus default port allocations list at the time of writing.
DEFAULT_PORT = 9808
QUEUES = (LM_QUEUE, MAINTENANCE_QUEUE)
#: Message header a producer may set to its send time (epoch seconds, float).
#: kombu's default ``unacked_key`` (hash of delivered, unacknowledged messages).
_UNACKED_KEY = "unacked"
#: ConfigError: the store's credentials or ACL rights were refused.
_REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, StoreUnavailable, ConfigError)

log = logging.getLogger(__name__)


def queue_keys(queue: str, transport_options: Mapping[str, Any] | None = None) -> list[str]:
    """The Redis lists kombu's Redis transport keeps for ``queue``.

    The queue itself holds priority 0 (the default); each other priority step ``n`` has
    its own list ``<queue><sep><n>`` (``sep`` is ``"\\x06\\x16"``), e.g. ``dspex\\x06\\x163``.
    Workers ``BRPOP`` them in this order.
    """
    options = transport_options or {}
    prefix = str(options.get("global_keyprefix") or "")
    sep = str(options.get("sep", Channel.sep))
    steps = options.get("priority_steps", PRIORITY_STEPS)
    return [f"{prefix}{queue}" if not step else f"{prefix}{queue}{sep}{step}" for step in steps]


def _message_id_and_sent_at(raw: bytes) -> tuple[str | None, float | None]:
    """``(task id or delivery tag, SENT_AT_HEADER value)`` of a kombu message, if present."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(message, dict):
        return None, None
    headers = message.get("headers")
    headers = headers if isinstance(headers, dict) else {}
    properties = message.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    ident = headers.get("id") or properties.get("delivery_tag")
    sent_at = headers.get(SENT_AT_HEADER)
    if isinstance(sent_at, bool) or not isinstance(sent_at, int | float):
        sent_at = None
    return (str(ident) if ident is not None else None), sent_at


class DspexCollector:
    """Computes every dspex metric from Redis when Prometheus scrapes.

    Args:
        store: the SessionStore (stats, last sweep, task outcome counters).
        broker: a redis-py client on the broker (``decode_responses=False``).
        queues: queue names to report.
        transport_options: the app's ``broker_transport_options`` (key prefix, priority
            separator and steps, if ever changed from kombu's defaults).
        clock: wall clock in epoch seconds (tests pass their own).
        lm_profiles: LM profiles always reported (besides those workers wrote counters for).
    """

    def __init__(
        self,
        store: SessionStore,
        broker: redis.Redis,
        *,
        queues: Sequence[str] = QUEUES,
        transport_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        lm_profiles: Sequence[str] = (),
    ) -> None:
        self.store = store
        self.lm_profiles = tuple(lm_profiles)
        self.broker = broker
        self.clock = clock
        options = dict(transport_options or {})
        self._queue_keys = {q: queue_keys(q, options) for q in queues}
        prefix = str(options.get("global_keyprefix") or "")
        self._unacked_key = prefix + str(options.get("unacked_key", _UNACKED_KEY))
        # list key -> (id of the message at its right end, when this exporter first saw it)
        self._first_seen: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> DspexCollector:
        """A collector on the store and broker that ``settings`` name."""
        app = make_celery(settings)
        options = dict(app.conf.broker_transport_options or {})
        app.close()
        # Sentinel / TLS aware, like the store; bytes, as the collector expects.
        broker = redis_client_for(settings, role="broker", decode_responses=False)
        profiles = [p.name for p in settings.lm_profiles.values() if p.limits or p.cache]
        return cls(
            SessionStore.from_settings(settings),
            broker,
            transport_options=options,
            lm_profiles=profiles,
        )

    def close(self) -> None:
        self.store.close()
        self.broker.close()

    # --- prometheus_client Collector protocol ---------------------------------------------

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily(
            "dspex_exporter_redis_up",
            "1 if this scrape could read Redis in this role (broker: queues, store: sessions)",
            labels=["role"],
        )
        try:
            broker_metrics = self._broker_metrics()
        except _REDIS_ERRORS as e:
            log.warning("broker unreadable during scrape: %s", e)
            broker_metrics = []
        up.add_metric(["broker"], 1.0 if broker_metrics else 0.0)
        try:
            store_metrics = self._store_metrics()
        except _REDIS_ERRORS as e:
            log.warning("store unreadable during scrape: %s", e)
            store_metrics = []
        up.add_metric(["store"], 1.0 if store_metrics else 0.0)
        yield from broker_metrics
        yield from store_metrics
        yield up
        yield GaugeMetricFamily(
            "dspex_exporter_scrape_duration_seconds",
            "Time this scrape spent reading Redis",
            value=time.perf_counter() - started,
        )

    # --- broker: queues ---------------------------------------------------------------

    def _broker_metrics(self) -> list[Metric]:
        pipe = self.broker.pipeline(transaction=False)
        for keys in self._queue_keys.values():
            for key in keys:
                pipe.llen(key)
                pipe.lindex(key, -1)
        pipe.hlen(self._unacked_key)
        replies = pipe.execute()
        now = self.clock()

        length = GaugeMetricFamily(
            "dspex_queue_length", "Messages waiting in the queue (all priorities)", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "dspex_queue_oldest_age_seconds",
            "Age of the next message to be consumed (0 when the queue is empty)",
            labels=["queue"],
        )
        at = 0
        for queue, keys in self._queue_keys.items():
            total = 0
            oldest = 0.0
            for key in keys:
                size, tail = int(replies[at]), replies[at + 1]
                at += 2
                total += size
                if tail is not None:
                    oldest = max(oldest, self._age(key, tail, now))
                else:
                    self._forget(key)
            length.add_metric([queue], float(total))
            age.add_metric([queue], oldest)
        unacked = GaugeMetricFamily(
            "dspex_broker_unacked_messages",
            "Messages delivered to workers and not yet acknowledged (running or reserved)",
            value=float(replies[at]),
        )
        return [length, age, unacked]

    def _age(self, key: str, raw: bytes, now: float) -> float:
        ident, sent_at = _message_id_and_sent_at(raw)
        if sent_at is not None:
            return max(0.0, now - sent_at)
        ident = ident or raw.hex()[:64]
        with self._lock:
            seen = self._first_seen.get(key)
            if seen is None or seen[0] != ident:
                seen = (ident, now)
                self._first_seen[key] = seen
        return max(0.0, now - seen[1])

    def _forget(self, key: str) -> None:
        with self._lock:
            self._first_seen.pop(key, None)

    # --- store: sessions, variables, programs, outcomes -----------------------------------

    def _store_metrics(self) -> list[Metric]:
        stats = self.store.stats()
        last_sweep = self.store.last_sweep_at()
        outcomes = self.store.task_outcomes()
        failure_codes = self.store.task_failure_codes()

        metrics: list[Metric] = [
            GaugeMetricFamily("dspex_sessions", "Live sessions", value=stats["sessions"]),
            CounterMetricFamily(
                "dspex_sessions_created", "Sessions created", value=stats["created"]
            ),
            CounterMetricFamily(
                "dspex_sessions_deleted", "Sessions deleted explicitly", value=stats["deleted"]
            ),
            CounterMetricFamily(
                "dspex_sessions_expired",
                "Sessions expired (sweep or lazy expiry)",
                value=stats["expired"],
            ),
            CounterMetricFamily(
                "dspex_expiry_sweeps", "Expiry sweeps finished", value=stats["sweeps"]
            ),
            GaugeMetricFamily(
                "dspex_variables", "Variables in live sessions", value=stats["variables"]
            ),
            GaugeMetricFamily(
                "dspex_programs", "Programs in live sessions", value=stats["programs"]
            ),
            GaugeMetricFamily(
                "dspex_global_programs", "Global programs", value=stats["global_programs"]
            ),
        ]
        if last_sweep is not None:
            metrics.append(
                GaugeMetricFamily(
                    "dspex_expiry_last_sweep_timestamp_seconds",
                    "When an expiry sweep last finished (epoch seconds)",
                    value=last_sweep.timestamp(),
                )
            )
        counts = CounterMetricFamily(
            "dspex_task_outcomes",
            "Task outcomes counted by the workers",
            labels=["task", "state"],
        )
        for (task, state), value in sorted(outcomes.items()):
            counts.add_metric([task, state], float(value))
        metrics.append(counts)
        failures = CounterMetricFamily(
            "dspex_task_failures",
            "Task failures counted by the workers, by error code (unknown: not a DspexError)",
            labels=["task", "code"],
        )
        for (task, code), value in sorted(failure_codes.items()):
            failures.add_metric([task, code], float(value))
        metrics.append(failures)
        metrics.extend(self._lm_metrics())
        return metrics

    def _lm_metrics(self) -> list[Metric]:
        stats = read_profile_stats(self.store.redis, self.store.keys, self.lm_profiles)

        def counter(name: str, doc: str, field: str, scale: float = 1.0) -> Metric:
            family = CounterMetricFamily(name, doc, labels=["profile"])
            for profile, counts in stats.items():
                family.add_metric([profile], counts[field] * scale)
            return family

        tokens = CounterMetricFamily(
            "dspex_lm_tokens", "LM tokens used, by profile and kind", labels=["profile", "kind"]
        )
        for profile, counts in stats.items():
            tokens.add_metric([profile, "prompt"], float(counts["prompt_tokens"]))
            tokens.add_metric([profile, "completion"], float(counts["completion_tokens"]))
        return [
            counter("dspex_lm_calls", "LM calls that reached the provider", "calls"),
            tokens,
            counter("dspex_lm_rate_limited", "Provider 429 answers", "rate_limited"),
            counter("dspex_lm_waits", "LM calls the rate limiter held back", "waits"),
            counter(
                "dspex_lm_wait_seconds", "Time LM calls waited for their turn", "wait_ms", 1e-3
            ),
            counter(
                "dspex_lm_deferred",
                "LM calls with no turn within max_wait_s (task retried later)",
                "deferred",
            ),
            counter("dspex_lm_cache_hits", "LM calls answered by the shared cache", "cache_hits"),
            counter("dspex_lm_cache_misses", "Cacheable LM calls the cache missed", "cache_misses"),
        ]


def build_registry(settings: Settings) -> tuple[CollectorRegistry, DspexCollector]:
    """A registry holding only the dspex collector (no process or platform metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    collector = DspexCollector.from_settings(settings)
    registry.register(collector)
    return registry, collector


def serve(settings: Settings, port: int = DEFAULT_PORT, address: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` on ``address:port`` until SIGTERM or Ctrl-C.

    The default address is loopback: pass ``0.0.0.0`` in a container.
    """
    registry, collector = build_registry(settings)
    stop = threading.Event()
    # Outside the main thread signal() raises ValueError: SIGTERM keeps its default action.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = start_http_server(port, addr=address, registry=registry)
    if isinstance(server, tuple):  # prometheus-client >= 0.20: the bound port (port 0 too)
        port = int(server[0].server_port)
    log.info("dspex exporter listening on http://%s:%d/metrics", address, port)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if isinstance(server, tuple):  # prometheus-client >= 0.20 returns (server, thread)
            server[0].shutdown()
        collector.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.exporter", description="dspex Prometheus exporter"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="default %(default)s")
    parser.add_argument("--address", default="127.0.0.1", help="bind address (default loopback)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(Settings.from_env(), port=args.port, address=args.address)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
