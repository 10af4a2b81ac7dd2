"""LM traffic control across a real cluster (DESIGN.md §11): one redis-server, three
``celery -A workers.worker worker`` processes (threads pool) and ``tests/fake_openai.py``
in a process of its own, reached through ordinary ``openai/fake`` profiles.

Every test uses its own profile of the same workers (one set for the module) and resets
the fake LM's records first. Shown:

- rpm: the calls of 3 workers stay within rpm +5% over every sliding 60 s window (and
  the fake LM, which answers 429 past that, never had to); calls that cannot get a turn
  within ``max_wait_s`` retry their task later (``lm_rate_limited``): no task fails;
- ``concurrency`` is never exceeded, counted at the LM;
- a 429 storm pauses the profile cluster-wide for the Retry-After instead of hammering;
- 300 tasks over 30 distinct prompts sent at once make exactly 30 LM calls;
- a session's token budget, spent mid-batch, fails the runs that start afterwards with
  ``budget_exceeded`` (not retried);
- a SIGKILLed worker's concurrency slot comes back within its lease.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.polling import holds_for, wait_until
from support.procs import TESTS, Proc, base_env, start_worker
from support.redis_server import RedisProc, start_redis_server

from dspex_tasks.client import Client
from dspex_tasks.errors import DspexError
from dspex_tasks.keys import Keys
from dspex_tasks.settings import Settings

pytestmark = [pytest.mark.timeout(240)]

N_WORKERS = 3
THREADS = 4
SIGNATURE = "question -> answer"
RPM = 120
LEASE_S = 2.0
PROFILES = {
    # A tight max_wait_s: at most ~6 turns can be reserved ahead, so most tasks defer.
    "rpm": {"limits": {"rpm": RPM, "max_wait_s": 3}},
    "conc": {"limits": {"concurrency": 3, "max_wait_s": 60}},
    "storm": {"limits": {"concurrency": 6, "max_wait_s": 60}},
    "cache": {"cache": {"ttl_s": 600}},
    "lease": {"limits": {"concurrency": 1, "lease_s": LEASE_S, "max_wait_s": 60}},
    "default": {},
}


@dataclass
class Cluster:
    redis: RedisProc
    lm_url: str
    env: dict[str, str]
    client: Client
    workers: list[Proc]
    tmp: Path

    @property
    def keys(self) -> Keys:
        return self.client.store.keys

    def fake(self, route: str, doc: dict[str, Any] | None = None) -> Any:
        url = f"{self.lm_url.removesuffix('/v1')}/_fake/{route}"
        data = None if doc is None else json.dumps(doc).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
            return json.loads(r.read())

    def session(self, profile: str) -> str:
        sid = f"lt-{profile}-{uuid.uuid4().hex[:8]}"
        self.client.create_session(sid)
        self.client.session(sid).configure_lm(profile)
        return sid

    def submit(self, sid: str, questions: list[str]) -> list[Any]:
        batch = self.client.submit_batch(
            {"session_id": sid, "signature": SIGNATURE, "inputs": {"question": q}}
            for q in questions
        )
        return batch.handles()

    def stats(self, profile: str) -> dict[str, int]:
        raw = self.client.store.redis.hgetall(self.keys.lm_stats(profile))
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.log()[-3000:]}" for w in self.workers)


def results(handles: list[Any], timeout: float) -> list[dict[str, Any] | DspexError]:
    deadline = time.monotonic() + timeout
    out: list[dict[str, Any] | DspexError] = []
    for h in handles:
        try:
            out.append(h.get_result(timeout=max(0.1, deadline - time.monotonic())))
        except DspexError as e:
            out.append(e)
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("lm-traffic-cluster")
    server = start_redis_server(data_dir=tmp / "redis")
    port_file = tmp / "lm.port"
    lm = subprocess.Popen(
        [sys.executable, str(TESTS / "fake_openai.py"), "--port", "0", "--delay-ms", "100",
         "--port-file", str(port_file)],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    workers: list[Proc] = []
    client: Client | None = None
    try:
        wait_until(port_file.exists, 15, what="the fake LM to listen")
        lm_url = f"http://127.0.0.1:{port_file.read_text().strip()}/v1"
        profiles = {
            name: {
                "model": "openai/fake",
                "api_base": lm_url,
                "api_key_env": "FAKE_KEY",
                "params": {"temperature": 0.0, "max_tokens": 32},
                **spec,
            }
            for name, spec in PROFILES.items()
        }
        env = base_env(
            server.url,
            f"lt{uuid.uuid4().hex[:6]}",
            DSPEX_LM_PROFILES=json.dumps(profiles),
            FAKE_KEY="sk-fake-cluster-key",
            DSPY_CACHEDIR=str(tmp / "dspy-cache"),
            # Deferrals are not retries: with none allowed, deferred tasks still run.
            DSPEX_TASK_MAX_RETRIES="0",
        )
        workers.extend(
            start_worker(env, tmp, app="workers.worker", concurrency=THREADS, queues="dspex")
            for _ in range(N_WORKERS)
        )
        for w in workers:
            w.wait_log(" ready.", 90)
        client = Client(settings=Settings.from_env(env))
        yield Cluster(server, lm_url, env, client, workers, tmp)
    finally:
        for w in workers:
            w.signal(15)
        for w in workers:
            w.stop(timeout=15)
        if client is not None:
            client.close()
        _stop(lm)
        server.stop()


@pytest.fixture
def lm(cluster: Cluster) -> Cluster:
    cluster.fake("reset", {})
    cluster.fake("config", {"delay_s": 0.1, "limit_rpm": None, "retry_after_s": 1.0})
    return cluster


def max_overlap(calls: list[dict[str, Any]]) -> int:
    edges = sorted([(c["arrived"], 1) for c in calls] + [(c["replied"], -1) for c in calls])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def failures(out: list[dict[str, Any] | DspexError]) -> list[DspexError]:
    return [r for r in out if isinstance(r, DspexError)]


# --- rpm and deferral ------------------------------------------------------------------


@pytest.mark.slow
def test_rpm_holds_over_every_60s_window_across_workers_and_no_task_fails(lm: Cluster) -> None:
    # The fake LM itself answers 429 past rpm +5% in any 60 s: it must never have to.
    limit = int(RPM * 1.05)
    lm.fake("config", {"limit_rpm": limit, "limit_window_s": 60.0})
    run = uuid.uuid4().hex[:6]
    n = RPM + 12  # a little over a minute of calls
    sid = lm.session("rpm")
    started = time.time()
    handles = lm.submit(sid, [f"rate MARK[{run}-{i}]" for i in range(n)])
    out = results(handles, 180)
    elapsed = time.time() - started
    assert failures(out) == [], lm.logs()
    # A deferral kept each run going: every one is recorded as succeeded, none as failed.
    statuses = {lm.client.store.get_run(sid, h.id).status for h in handles}
    assert statuses == {"succeeded"}
    seen = lm.fake("calls")
    arrivals = sorted(seen["arrivals"])
    assert seen["rejected"] == []
    assert len(arrivals) == n
    worst = max(sum(1 for u in arrivals[i:] if u < t + 60) for i, t in enumerate(arrivals))
    assert worst <= limit
    # Spaced, not bursty: no second ever held more than rpm / 60 (+1 at its edge).
    worst_second = max(sum(1 for u in arrivals[i:] if u < t + 1) for i, t in enumerate(arrivals))
    assert worst_second <= RPM // 60 + 1
    wait_until(lambda: lm.stats("rpm").get("calls", 0) >= n, 10, what="the counters")
    stats = lm.stats("rpm")
    # Most tasks could not get a turn within max_wait_s: their tasks were retried later.
    assert stats["deferred"] > 0
    # ... each about once: deferred calls come back spread out near their turns.
    assert stats["deferred"] <= 2 * n
    print(
        f"\nrpm {RPM}: {n} tasks in {elapsed:.1f} s on {N_WORKERS} workers; busiest 60 s "
        f"window {worst} calls (bound {limit}); deferred {stats['deferred']} times, "
        f"waited {stats.get('waits', 0)} times; 429s 0"
    )


# --- concurrency -----------------------------------------------------------------------


def test_concurrency_is_never_exceeded_across_workers(lm: Cluster) -> None:
    lm.fake("config", {"delay_s": 0.3})
    run = uuid.uuid4().hex[:6]
    sid = lm.session("conc")
    out = results(lm.submit(sid, [f"conc MARK[{run}-{i}]" for i in range(24)]), 90)
    assert failures(out) == [], lm.logs()
    calls = [c for c in lm.fake("calls")["calls"] if (c["marker"] or "").startswith(run)]
    assert len(calls) == 24
    assert max_overlap(calls) == 3  # reached, never exceeded (12 threads wanted in)


# --- a 429 storm -----------------------------------------------------------------------


def test_a_429_storm_pauses_the_cluster_instead_of_hammering(lm: Cluster) -> None:
    retry_after = 2.0
    lm.fake("config", {"retry_after_s": retry_after, "storm_s": retry_after})
    run = uuid.uuid4().hex[:6]
    sid = lm.session("storm")
    out = results(lm.submit(sid, [f"storm MARK[{run}-{i}]" for i in range(20)]), 90)
    assert failures(out) == [], lm.logs()
    seen = lm.fake("calls")
    rejected = sorted(seen["rejected"])
    answered = [c for c in seen["calls"] if (c["marker"] or "").startswith(run)]
    assert len(answered) == 20
    # Only the calls already in flight (at most `concurrency`) met the storm ...
    assert 1 <= len(rejected) <= 6
    assert rejected[-1] - rejected[0] < 1.0
    # ... then nothing went out, from any worker, until the Retry-After had passed.
    assert min(c["arrived"] for c in answered) >= rejected[0] + retry_after - 0.05
    wait_until(lambda: lm.stats("storm").get("rate_limited", 0) >= 1, 10, what="the counters")


# --- the shared cache ------------------------------------------------------------------


def test_300_tasks_over_30_prompts_make_exactly_30_lm_calls(lm: Cluster) -> None:
    lm.fake("config", {"delay_s": 0.3})
    run = uuid.uuid4().hex[:6]
    sids = [lm.session("cache") for _ in range(3)]
    handles = []
    for k, sid in enumerate(sids):
        handles += lm.submit(sid, [f"same MARK[{run}-{i % 30}]" for i in range(k, 300, 3)])
    out = results(handles, 120)
    assert failures(out) == [], lm.logs()
    calls = [c for c in lm.fake("calls")["calls"] if (c["marker"] or "").startswith(run)]
    assert len(calls) == 30
    assert sum(1 for r in out if isinstance(r, dict) and r["lm"]["cached"]) == 270
    for r in out:
        assert isinstance(r, dict)
        marker = r["outputs"]["answer"].split("MARK[", 1)[-1]
        assert marker.startswith(run)
    usage = [lm.client.session(sid).usage() for sid in sids]
    assert sum(u["calls"] for u in usage) == 300
    assert sum(u["cached_calls"] for u in usage) == 270


# --- budgets ---------------------------------------------------------------------------


def test_a_budget_spent_mid_batch_fails_the_runs_that_start_afterwards(lm: Cluster) -> None:
    lm.fake("config", {"delay_s": 0.3})
    run = uuid.uuid4().hex[:6]
    sid = lm.session("default")
    lm.client.session(sid).set_budget(60)  # one call of the fake LM (50 + 10 tokens)
    started = time.monotonic()
    out = results(lm.submit(sid, [f"budget MARK[{run}-{i}]" for i in range(30)]), 90)
    failed = failures(out)
    ok = [r for r in out if isinstance(r, dict)]
    assert ok and failed, f"{len(ok)} ok, {len(failed)} failed"
    assert {e.code for e in failed} == {"budget_exceeded"}
    assert all(e.details["spent_tokens"] >= 60 for e in failed)
    usage = lm.client.session(sid).usage()
    assert usage["calls"] == len(ok)  # a refused run calls nothing
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 60 * len(ok)
    # Not retried: every refusal came back at once, not after a retry's countdown.
    assert time.monotonic() - started < 10


# --- a killed worker's slot ------------------------------------------------------------


def test_a_killed_workers_concurrency_slot_comes_back_within_its_lease(lm: Cluster) -> None:
    run = uuid.uuid4().hex[:6]
    sid = lm.session("lease")
    slots_key = lm.keys.lm_limits("lease")[1]
    redis_client = lm.client.store.redis
    (held,) = lm.submit(sid, [f"HANG MARK[{run}-held]"])  # never answered
    wait_until(lambda: f"{run}-held" in lm.fake("calls")["hanging"], 30, what="the held call")
    assert redis_client.zcard(slots_key) == 1
    victim = next(w for w in lm.workers if held.id in w.log())
    # The lease is renewed while its holder lives: the slot stays held past one lease.
    holds_for(lambda: redis_client.zcard(slots_key) == 1, LEASE_S, what="the held slot")
    victim.kill()
    killed = time.monotonic()
    lm.workers.remove(victim)
    lm.workers.append(
        start_worker(lm.env, lm.tmp, app="workers.worker", concurrency=THREADS, queues="dspex")
    )
    (after,) = lm.submit(sid, [f"after MARK[{run}-after]"])
    assert run in after.get(timeout=60)["answer"]
    back_in = time.monotonic() - killed
    assert back_in <= LEASE_S + 3
    assert redis_client.zcard(slots_key) == 0
    print(f"\nkilled holder's slot back after {back_in:.1f} s (lease {LEASE_S:g} s)")
