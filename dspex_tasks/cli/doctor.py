"""``dspex-tasks doctor``: can this deployment serve tasks right now?

Checks, in order: Redis (PING and version), workers (ping; queue depths), the LM (a tiny
``dspex.predict`` on a temporary session, deleted afterwards), LM traffic (each profile's
``limits`` and ``cache`` and its current use of them), the local model (when
``dspex_tasks.lm.engines.local`` is installed), and beat (the expiry sweep ran recently).
A check never raises: its failure is its result.
"""

from __future__ import annotations

import contextlib
import importlib
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from kombu.exceptions import ChannelError

from dspex_tasks.app import LM_QUEUE, MAINTENANCE_QUEUE
from dspex_tasks.client import Client
from dspex_tasks.errors import DspexError

__all__ = ["CHECKS", "Check", "run_checks"]

CHECKS = ("redis", "workers", "lm", "lm_traffic", "local_model", "beat")
#: The worker's offline placeholder LM (dspex_tasks.lm.ECHO_MODEL; not imported: dspy).
_ECHO = "dspex/echo"
#: Beat counts as alive when a sweep finished within this many expiry intervals.
BEAT_INTERVALS = 3


@dataclass
class Check:
    """One check's outcome. ``status`` is ok, warn (works, but look), fail, or skip."""

    name: str
    status: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "summary": self.summary, **self.details}


def _error_text(e: BaseException) -> str:
    if isinstance(e, DspexError):
        return f"{e.code}: {e.message}"
    return f"{type(e).__name__}: {e}"


def check_redis(client: Client) -> Check:
    started = time.perf_counter()
    try:
        client.store.redis.ping()
        ping_ms = (time.perf_counter() - started) * 1000
        version = str(client.store.redis.info("server").get("redis_version", "?"))
    except Exception as e:
        return Check("redis", "fail", f"unreachable: {_error_text(e)}")
    return Check(
        "redis",
        "ok",
        f"Redis {version}, PING {ping_ms:.1f} ms",
        {"version": version, "ping_ms": round(ping_ms, 3)},
    )


def _queue_depths(client: Client) -> dict[str, int]:
    depths: dict[str, int] = {}
    with client.app.connection_for_read() as conn:
        channel = conn.default_channel
        for queue in (LM_QUEUE, MAINTENANCE_QUEUE):
            try:
                depths[queue] = int(channel.queue_declare(queue, passive=True).message_count)
            except ChannelError:
                # Kombu's Redis transport says "no queue" for an empty (absent) list.
                depths[queue] = 0
    return depths


def check_workers(client: Client) -> Check:
    try:
        names = list(client.workers(timeout_s=1.0))
    except Exception as e:
        return Check("workers", "fail", f"cannot ping workers: {_error_text(e)}")
    details: dict[str, Any] = {"online": names, "count": len(names)}
    queued = ""
    try:
        details["queued"] = _queue_depths(client)
        queued = "; queued: " + ", ".join(f"{q} {n}" for q, n in details["queued"].items())
    except Exception as e:  # depth is a nicety; the ping is the check
        details["queued_error"] = _error_text(e)
    if not names:
        return Check("workers", "fail", f"no worker answered a ping within 1 s{queued}", details)
    return Check("workers", "ok", f"{len(names)} online ({', '.join(names)}){queued}", details)


def check_lm(client: Client, *, profile: str, timeout_s: float) -> Check:
    sid = f"doctor-{uuid.uuid4().hex[:12]}"
    try:
        session = client.create_session(
            sid, ttl_s=max(60.0, timeout_s * 2), metadata={"created_by": "dspex-tasks doctor"}
        )
    except Exception as e:
        return Check("lm", "fail", f"cannot create a temporary session: {_error_text(e)}")
    try:
        if profile != "default":
            session.configure_lm(profile=profile)
        started = time.perf_counter()
        handle = session.predict("question -> answer", question="Reply with one word: pong")
        result = handle.get_result(timeout=timeout_s)
        latency_ms = (time.perf_counter() - started) * 1000
    except TimeoutError:
        return Check(
            "lm",
            "fail",
            f"profile {profile!r}: no answer within {timeout_s:g} s "
            "(LM slow or down, or the queue is long)",
            {"profile": profile},
        )
    except Exception as e:
        return Check("lm", "fail", f"profile {profile!r}: {_error_text(e)}", {"profile": profile})
    finally:
        # Best effort: the session expires on its own anyway.
        with contextlib.suppress(Exception):
            session.delete()
    model = str(result.get("lm", {}).get("model", "unknown"))
    details = {
        "profile": profile,
        "model": model,
        "latency_ms": round(latency_ms, 1),
        "task_ms": result.get("duration_ms"),
        "answer": str(result.get("outputs", {}).get("answer", ""))[:200],
    }
    summary = f"profile {profile!r} answered in {latency_ms:.0f} ms (model {model})"
    if model == _ECHO:
        return Check(
            "lm",
            "warn",
            f"{summary}: the offline placeholder LM; set DSPEX_LM for real answers",
            details,
        )
    return Check("lm", "ok", summary, details)


def check_local_model() -> Check:
    try:
        local_lm = importlib.import_module("dspex_tasks.lm.engines.local")
    except ImportError:
        return Check("local_model", "skip", "dspex_tasks.lm.engines.local is not installed")
    available: Callable[[], bool] | None = getattr(local_lm, "available", None)
    probe: Callable[[], dict[str, Any]] | None = getattr(local_lm, "probe", None)
    if available is None or probe is None:
        return Check("local_model", "skip", "dspex_tasks.lm.engines.local has no probe()")
    try:
        if not available():
            return Check("local_model", "skip", "no local model installed")
        report = dict(probe())
    except Exception as e:
        return Check("local_model", "fail", f"probe failed: {_error_text(e)}")
    if not report.get("loaded"):
        return Check("local_model", "fail", f"model did not load: {report.get('error')}", report)
    load_s = float(report.get("load_s") or 0.0)
    tps = float(report.get("tokens_per_s") or 0.0)
    return Check(
        "local_model",
        "ok",
        f"{report.get('model_path')} loaded in {load_s:.2f} s, {tps:.0f} tokens/s",
        report,
    )


def check_lm_traffic(client: Client) -> Check:
    """Each LM profile's limits and cache (from this process's ``DSPEX_LM_PROFILES``) and
    its current use of them: calls in flight against ``concurrency``, a 429 pause, how far
    ahead the rpm / tpm schedules are booked, and the workers' counters (profiles that
    only workers know show their counters)."""
    from dspex_tasks.lm.limits import limiter_state, read_profile_stats

    configured = {name: p for name, p in client.settings.lm_profiles.items() if p.limits or p.cache}
    store = client.store
    try:
        counted = read_profile_stats(store.redis, store.keys)
        states = {
            name: limiter_state(store.redis, store.keys, name, configured[name].limits)
            if name in configured
            else limiter_state(store.redis, store.keys, name, None)
            for name in sorted(set(configured) | set(counted))
        }
    except Exception as e:
        return Check("lm_traffic", "fail", f"cannot read the LM limiter: {_error_text(e)}")
    if not states:
        return Check("lm_traffic", "ok", "no LM profile sets limits or cache")
    status = "ok"
    parts = []
    for name, state in states.items():
        profile = configured.get(name)
        limits = profile.limits if profile else None
        cache = profile.cache if profile else None
        state["cache"] = None if cache is None else {"ttl_s": cache.ttl_s, "scope": cache.scope}
        bits = []
        if limits is not None:
            if limits.rpm:
                bits.append(f"rpm {limits.rpm} (booked {state['queue_s']:g} s ahead)")
            if limits.tpm:
                bits.append(f"tpm {limits.tpm} (booked {state['tokens_queue_s']:g} s ahead)")
            if limits.concurrency:
                bits.append(f"{state['in_flight']}/{limits.concurrency} in flight")
                if state["in_flight"] >= limits.concurrency:
                    status = "warn"
        if state["paused_s"] > 0:
            bits.append(f"PAUSED {state['paused_s']:g} s after a 429")
            status = "warn"
        if cache is not None:
            bits.append(f"cache {cache.scope} ttl {cache.ttl_s:g} s")
        c = state["counters"]
        bits.append(
            f"{c['calls']} calls, {c['prompt_tokens'] + c['completion_tokens']} tokens, "
            f"{c['rate_limited']} 429s, {c['deferred']} deferred, {c['cache_hits']} cache hits"
        )
        if profile is None:
            bits.append("limits not configured here")
        parts.append(f"{name}: " + ", ".join(bits))
    return Check("lm_traffic", status, "; ".join(parts), {"profiles": states})


def check_beat(client: Client) -> Check:
    interval_s = client.settings.expiry_interval_s
    limit_s = BEAT_INTERVALS * interval_s
    try:
        last = client.store.last_sweep_at()
        seconds, micros = client.store.redis.time()
    except Exception as e:
        return Check("beat", "fail", f"cannot read the sweep record: {_error_text(e)}")
    details: dict[str, Any] = {"interval_s": interval_s, "last_sweep_at": None}
    if last is None:
        return Check(
            "beat",
            "warn",
            "no expiry sweep recorded yet: is beat running (and a worker on "
            f"{MAINTENANCE_QUEUE})? Native Redis expiry still reclaims memory",
            details,
        )
    age_s = seconds + micros / 1e6 - last.timestamp()
    details.update(last_sweep_at=last.isoformat(), age_s=round(age_s, 3))
    if age_s > limit_s:
        return Check(
            "beat",
            "warn",
            f"last expiry sweep {age_s:.0f} s ago, over {BEAT_INTERVALS} x "
            f"DSPEX_EXPIRY_INTERVAL_S ({interval_s:g} s): is beat running?",
            details,
        )
    return Check("beat", "ok", f"last expiry sweep {age_s:.1f} s ago", details)


def run_checks(
    client: Client,
    *,
    skip: Collection[str] = (),
    lm_profile: str = "default",
    lm_timeout_s: float = 30.0,
) -> list[Check]:
    """Run every check not in ``skip``; later checks are skipped when they cannot work."""
    checks: list[Check] = []

    def add(name: str, run: Callable[[], Check], blocked_by: str | None = None) -> None:
        if name in skip:
            checks.append(Check(name, "skip", "skipped (--skip)"))
        elif blocked_by is not None:
            checks.append(Check(name, "skip", blocked_by))
        else:
            checks.append(run())

    add("redis", lambda: check_redis(client))
    redis_ok = checks[-1].status == "ok" or "redis" in skip
    # With the broker on the same (unreachable) Redis, a ping would retry forever.
    same_server = client.settings.broker_url == client.settings.redis_url
    add(
        "workers",
        lambda: check_workers(client),
        None if redis_ok or not same_server else "Redis is unreachable",
    )
    workers_ok = checks[-1].status == "ok"
    add(
        "lm",
        lambda: check_lm(client, profile=lm_profile, timeout_s=lm_timeout_s),
        None if workers_ok and redis_ok else "needs Redis and an online worker",
    )
    add(
        "lm_traffic",
        lambda: check_lm_traffic(client),
        None if redis_ok else "Redis is unreachable",
    )
    add("local_model", check_local_model)
    add("beat", lambda: check_beat(client), None if redis_ok else "Redis is unreachable")
    return checks
