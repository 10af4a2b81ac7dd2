"""Where a worker's LM calls meet the cluster: limits, shared cache and per-run usage.

Every LM a profile builds is a :class:`TrafficLM`: a ``dspy.LM`` whose ``__call__`` runs
DSPy's own ``prepare`` / ``execute`` / ``finalize`` steps with a :class:`Gate` around
``execute``. The gate

- counts the call in the run's :class:`RunUsage` (in the process, no Redis): calls,
  cached calls, prompt and completion tokens -- the runtime writes them to the session
  once per run;
- with a profile ``cache``: looks the call up in Redis, single-flight (``lm/cache.py``);
- with profile ``limits``: reserves the call's turn and settles it (``lm/limits.py``;
  the settle is sent by a background thread, off the call path),
  pausing the profile cluster-wide on a 429 and trying again within ``max_wait_s``.

A profile with neither makes no Redis call at all. DSPy's own retry loop is off for
limited profiles (its retries would bypass the limiter); the gate retries transient
errors through the limiter instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import dspy
import redis
from dspy.clients.call_result import CallResult
from dspy.clients.execution import execute, finalize, prepare
from dspy.utils.callback import with_callbacks
from dspy.utils.exceptions import LMRateLimitError, is_retryable_lm_error

from dspex_tasks.keys import Keys
from dspex_tasks.lm import abandon
from dspex_tasks.lm.cache import LMCache, cache_digest
from dspex_tasks.lm.limits import LeaseRenewer, ProfileStats, RateLimiter, Settler
from dspex_tasks.settings import LMCacheConfig, LMProfileConfig

__all__ = [
    "Gate",
    "LMTraffic",
    "RunUsage",
    "TrafficLM",
    "counted",
    "current_usage",
    "run_usage",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A 429 without Retry-After pauses the profile this long.
DEFAULT_PAUSE_S = 1.0


@dataclass
class RunUsage:
    """What one run's LM calls used (filled by the gates, read by the runtime)."""

    session_id: str | None = None
    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Whether a call of the run went through a profile with a cache.
    cache_on: bool = False

    def add(self, usage: Any, *, cached: bool) -> None:
        self.calls += 1
        if cached:
            self.cached_calls += 1
            return
        prompt, completion = _tokens(usage)
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    @property
    def all_cached(self) -> bool:
        return self.calls > 0 and self.cached_calls == self.calls

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "calls": self.calls,
            "cached_calls": self.cached_calls,
        }


_RUN: contextvars.ContextVar[RunUsage | None] = contextvars.ContextVar("dspex_run", default=None)


@contextlib.contextmanager
def run_usage(session_id: str | None) -> Iterator[RunUsage]:
    """Count the LM calls made in this context (thread) for one run of ``session_id``."""
    usage = RunUsage(session_id)
    token = _RUN.set(usage)
    try:
        yield usage
    finally:
        _RUN.reset(token)


def counted(usage: RunUsage, fn: Callable[[], T]) -> T:
    """``fn()`` with its LM calls counted in ``usage`` (call it in the thread that runs)."""
    token = _RUN.set(usage)
    try:
        return fn()
    finally:
        _RUN.reset(token)


def current_usage() -> RunUsage | None:
    return _RUN.get()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _tokens(usage: Any) -> tuple[int, int]:
    if not isinstance(usage, dict):
        return 0, 0
    return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))


def _estimate(lm: Any, call: Any) -> int:
    """Tokens a call may use, for the tpm reservation: prompt chars / 4 + max_tokens."""
    chars = 0
    for m in call.messages or ():
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", "")
        chars += len(content) if isinstance(content, str) else len(str(content or ""))
    if isinstance(call.prompt, str):
        chars += len(call.prompt)
    max_tokens = {**lm.kwargs, **call.kwargs}.get("max_tokens") or 256
    return chars // 4 + int(max_tokens)


def _retry_after(error: BaseException) -> float | None:
    seen: BaseException | None = error
    for _ in range(4):
        if seen is None:
            return None
        value = getattr(seen, "retry_after", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            return float(value)
        seen = seen.__cause__ or seen.__context__
    return None


def _is_429(error: BaseException) -> bool:
    return isinstance(error, LMRateLimitError) or getattr(error, "status", None) == 429


class Gate:
    """One profile's traffic control (shared by every copy of its LM)."""

    def __init__(
        self,
        profile: str,
        *,
        limiter: RateLimiter | None = None,
        cache: LMCache | None = None,
        stats: ProfileStats | None = None,
        retries: int = 0,
    ) -> None:
        self.profile = profile
        self.limiter = limiter
        self.cache = cache
        self.stats = stats
        self.retries = retries

    def execute(self, lm: Any, call: Any) -> Any:
        run = _RUN.get()
        keys = self._cache_keys(lm, call, run) if self.cache is not None else None
        if keys is None:
            return self._counted(lm, call, run)
        assert self.cache is not None
        if run is not None:
            run.cache_on = True
        token = uuid.uuid4().hex
        record, lead = self.cache.get_or_lead(keys, token)
        if record is not None:
            try:
                result = CallResult.load(record)
            except Exception as e:  # an entry another version wrote: call instead
                log.warning("unreadable LM cache entry (%s): calling the LM", type(e).__name__)
            else:
                if run is not None:
                    run.add(None, cached=True)
                self._count(cache_hits=1)
                return result
        self._count(cache_misses=1)
        if not lead:
            return self._counted(lm, call, run)
        stored: Any = None
        try:
            result = self._counted(lm, call, run)
            stored = result.dump()
            return result
        finally:
            self.cache.put(keys, token, stored)

    def _cache_keys(self, lm: Any, call: Any, run: RunUsage | None) -> list[str] | None:
        assert self.cache is not None
        if call.n != 1 and call.request is None:
            return None
        params = {**lm.kwargs, **call.kwargs}
        temperature = params.get("temperature")
        hot = isinstance(temperature, (int, float)) and temperature > 0
        if hot and not self.cache.config.any_temperature:
            return None
        digest = cache_digest(lm.model, params.get("api_base"), call.key(lm, False))
        return self.cache.key_for(digest, run.session_id if run else None)

    def _count(self, **counts: int) -> None:
        if self.stats is not None:
            self.stats.add(self.profile, **counts)

    def _counted(self, lm: Any, call: Any, run: RunUsage | None) -> Any:
        result = self._limited(lm, call) if self.limiter is not None else execute(lm, call)
        if run is not None:
            run.add(result.usage, cached=False)
        if self.stats is not None:
            prompt, completion = _tokens(result.usage)
            self.stats.add(
                self.profile, calls=1, prompt_tokens=prompt, completion_tokens=completion
            )
        return result

    def _limited(self, lm: Any, call: Any) -> Any:
        limiter = self.limiter
        assert limiter is not None
        deadline = time.monotonic() + limiter.limits.max_wait_s
        estimate = _estimate(lm, call)
        failures = 0
        while True:
            turn = limiter.reserve(estimate, deadline)
            try:
                abandon.check()  # stopped while it waited for its turn
                result = execute(lm, call)
            except Exception as e:
                if _is_429(e):
                    pause = _retry_after(e) or DEFAULT_PAUSE_S
                    limiter.settle(turn, tokens=0, retry_after_s=pause)
                    self._count(rate_limited=1)
                    log.warning(
                        "LM profile %s: the provider answered 429; pausing it cluster-wide "
                        "for %.1f s",
                        self.profile,
                        pause,
                    )
                    continue  # reserve waits the pause out, within max_wait_s
                limiter.settle(turn, tokens=0)
                if is_retryable_lm_error(e) and failures < self.retries:
                    failures += 1
                    continue
                raise
            except BaseException:
                limiter.settle(turn, tokens=0)
                raise
            prompt, completion = _tokens(result.usage)
            limiter.settle(turn, tokens=prompt + completion if prompt or completion else None)
            return result


class TrafficLM(dspy.LM):  # type: ignore[misc]
    """A ``dspy.LM`` whose calls pass through its profile's :class:`Gate`."""

    _dspex_gate: Gate | None = None
    #: The run this LM (and every copy of it) works for: its usage and its stop switch,
    #: bound for calls made on threads the run did not start (DSPy's parallel evaluation
    #: pool), which see neither otherwise. Set on a run's own copy only (``carrying``).
    _dspex_carry: tuple[RunUsage, abandon.RunStop] | None = None

    @with_callbacks  # type: ignore[untyped-decorator]
    def __call__(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        carry = self._dspex_carry
        if carry is None or _RUN.get() is not None:
            return self._call(prompt, messages, kwargs)
        token, previous = _RUN.set(carry[0]), abandon.bound()
        abandon.bind(carry[1])
        try:
            return self._call(prompt, messages, kwargs)
        finally:
            abandon.bind(previous)
            _RUN.reset(token)

    def _call(self, prompt: Any, messages: Any, kwargs: dict[str, Any]) -> Any:
        # This override bypasses the stop check lm/abandon.py wraps BaseLM.__call__ with.
        abandon.check()
        call = prepare(self, prompt, messages, kwargs)
        gate = self._dspex_gate
        result = gate.execute(self, call) if gate is not None else execute(self, call)
        return finalize(self, call, result)

    def carrying(
        self, usage: RunUsage, stop: abandon.RunStop, gate: Gate | None = None
    ) -> TrafficLM:
        """A copy of this LM bound to one run (and through ``gate`` if given: with a
        cache, it replaces the process's own, so every call is the shared cache's)."""
        cached = gate is not None and gate.cache is not None
        lm: TrafficLM = self.copy(cache=False) if cached else self.copy()
        lm._dspex_carry = (usage, stop)
        if gate is not None:
            lm._dspex_gate = gate
        return lm


class LMTraffic:
    """Builds the gates of a worker's profiles over one Redis client."""

    def __init__(self, client: redis.Redis | None, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self.renewer = LeaseRenewer(client) if client is not None else None
        self.stats = ProfileStats(client, keys) if client is not None else None
        self.settler = Settler(client) if client is not None else None
        self.limiters: dict[str, RateLimiter] = {}

    def gate(self, profile: LMProfileConfig, retries: int) -> Gate:
        limiter = cache = None
        if self.redis is None or self.renewer is None:
            if profile.limits or profile.cache:
                log.warning("LM profile %s: limits and cache need Redis; none given", profile.name)
            return Gate(profile.name)
        if profile.limits is not None:
            limiter = self.limiters.get(profile.name)
            if limiter is None:
                limiter = RateLimiter(
                    self.redis,
                    self.keys,
                    profile.name,
                    profile.limits,
                    renewer=self.renewer,
                    stats=self._stats(),
                    settler=self.settler,
                )
                self.limiters[profile.name] = limiter
        if profile.cache is not None:
            cache = LMCache(self.redis, self.keys, profile.cache)
        on = limiter is not None or cache is not None
        return Gate(
            profile.name,
            limiter=limiter,
            cache=cache,
            stats=self.stats if on else None,
            retries=retries,
        )

    def with_cache(self, gate: Gate, config: LMCacheConfig) -> Gate:
        """``gate``'s limits, with a cache of its own (``gate``'s if it has one): a
        compile's calls, so that a later delivery of the run replays them for free."""
        if gate.cache is not None or self.redis is None:
            return gate
        return Gate(
            gate.profile,
            limiter=gate.limiter,
            cache=LMCache(self.redis, self.keys, config),
            stats=self.stats,
            retries=gate.retries,
        )

    def flush(self, timeout_s: float = 5.0) -> None:
        """Send what the background threads still hold (settles, counters) now; after it
        they send nothing until the next LM call (before closing the client, in tests)."""
        if self.settler is not None:
            self.settler.join(timeout_s)
        if self.stats is not None:
            self.stats.flush()

    def _stats(self) -> ProfileStats:
        assert self.stats is not None
        return self.stats
