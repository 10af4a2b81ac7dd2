"""The one Settings object, built from ``DSPEX_*`` environment variables at the process edge.

Invalid values fail at start-up with a :class:`ConfigError` naming the variable. Secrets
(passwords inside URLs, Flower credentials) are wrapped so no repr or log line shows them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dspex_tasks.errors import ConfigError

__all__ = ["LMCacheConfig", "LMLimits", "LMProfileConfig", "Secret", "Settings", "mask_url"]

ENV_PREFIX = "DSPEX_"


class Secret:
    """A string whose repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for logs and reprs).

    A ``;``-separated list (Celery's ``sentinel://h1:p1;sentinel://h2:p2``) is masked
    element by element.
    """
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


@dataclass(frozen=True)
class LMLimits:
    """A profile's cluster-wide limits (DESIGN.md §11); None: that limit is off."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    #: Longest a call waits for its turn before its task is retried later.
    max_wait_s: float = 30.0
    #: A concurrency slot's lease: renewed while its call runs, so a killed worker's
    #: slot comes back within this long.
    lease_s: float = 10.0


@dataclass(frozen=True)
class LMCacheConfig:
    """A profile's shared LM cache in Redis (DESIGN.md §11)."""

    ttl_s: float = 86400.0
    scope: str = "global"
    #: Cache calls made with a temperature > 0 too (off: only deterministic calls).
    any_temperature: bool = False
    #: Longest a call waits for an identical call in flight before calling itself.
    wait_s: float = 30.0


@dataclass(frozen=True)
class LMProfileConfig:
    """One named LM profile from worker configuration; never built from producer input."""

    name: str
    model: str
    api_base: str | None = None
    api_key_env: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    #: Seconds one LM request may take (the worker caps it at the task's soft limit).
    timeout_s: float = 120.0
    limits: LMLimits | None = None
    cache: LMCacheConfig | None = None


def _positive(where: str, value: Any, *, integer: bool) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < float("inf"):
        what = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{where} must be {what}, got {value!r}")
    return value


def _lm_limits(name: str, raw: Any) -> LMLimits | None:
    if raw is None:
        return None
    where = f"DSPEX_LM_PROFILES[{name!r}].limits"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object")
    unknown = set(raw) - {"rpm", "tpm", "concurrency", "max_wait_s", "lease_s"}
    if unknown:
        raise ConfigError(f"{where} has unknown keys: {sorted(unknown)}")
    ints: dict[str, Any] = {
        k: _positive(f"{where}.{k}", raw[k], integer=True)
        for k in ("rpm", "tpm", "concurrency")
        if raw.get(k) is not None
    }
    floats: dict[str, Any] = {
        k: float(_positive(f"{where}.{k}", raw[k], integer=False))
        for k in ("max_wait_s", "lease_s")
        if raw.get(k) is not None
    }
    return LMLimits(**ints, **floats)


def _lm_cache(name: str, raw: Any) -> LMCacheConfig | None:
    if raw is None or raw is False:
        return None
    where = f"DSPEX_LM_PROFILES[{name!r}].cache"
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object")
    unknown = set(raw) - {"ttl_s", "scope", "any_temperature", "wait_s"}
    if unknown:
        raise ConfigError(f"{where} has unknown keys: {sorted(unknown)}")
    scope = raw.get("scope", "global")
    if scope not in ("global", "session"):
        raise ConfigError(f"{where}.scope must be 'global' or 'session', got {scope!r}")
    any_temperature = raw.get("any_temperature", False)
    if not isinstance(any_temperature, bool):
        raise ConfigError(f"{where}.any_temperature must be true or false")
    numbers = {
        k: float(_positive(f"{where}.{k}", raw[k], integer=False))
        for k in ("ttl_s", "wait_s")
        if raw.get(k) is not None
    }
    return LMCacheConfig(scope=scope, any_temperature=any_temperature, **numbers)


def _lm_profiles(raw: str | None, default_model: str | None) -> dict[str, LMProfileConfig]:
    profiles: dict[str, LMProfileConfig] = {}
    if raw:
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"DSPEX_LM_PROFILES is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError("DSPEX_LM_PROFILES must be a JSON object of named profiles")
        for name, spec in data.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
                raise ConfigError(f"DSPEX_LM_PROFILES[{name!r}] needs a string 'model'")
            unknown = set(spec) - {
                *("model", "api_base", "api_key_env", "params", "timeout_s", "limits", "cache")
            }
            if unknown:
                raise ConfigError(
                    f"DSPEX_LM_PROFILES[{name!r}] has unknown keys: {sorted(unknown)}"
                )
            params = spec.get("params") or {}
            if not isinstance(params, dict):
                raise ConfigError(f"DSPEX_LM_PROFILES[{name!r}].params must be an object")
            timeout_s = spec.get("timeout_s", LMProfileConfig.timeout_s)
            if (
                isinstance(timeout_s, bool)
                or not isinstance(timeout_s, (int, float))
                or not 0 < timeout_s < float("inf")
            ):
                raise ConfigError(
                    f"DSPEX_LM_PROFILES[{name!r}].timeout_s must be a positive number of seconds"
                )
            profiles[name] = LMProfileConfig(
                name=name,
                model=spec["model"],
                api_base=spec.get("api_base"),
                api_key_env=spec.get("api_key_env"),
                params=dict(params),
                timeout_s=float(timeout_s),
                limits=_lm_limits(name, spec.get("limits")),
                cache=_lm_cache(name, spec.get("cache")),
            )
    if default_model and "default" not in profiles:
        profiles["default"] = LMProfileConfig(name="default", model=default_model)
    return profiles


class _Env:
    """Typed reads of ``DSPEX_*`` variables; every failure names the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self._environ.get(ENV_PREFIX + name)
        return default if value is None or value == "" else value

    def integer(self, name: str, default: int | None, *, minimum: int = 0) -> int | None:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{ENV_PREFIX}{name} must be >= {minimum}, got {value}")
        return value

    def req_int(self, name: str, default: int, *, minimum: int = 0) -> int:
        value = self.integer(name, default, minimum=minimum)
        assert value is not None
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{name} must be a number, got {raw!r}") from None
        if not value >= minimum:
            raise ConfigError(f"{ENV_PREFIX}{name} must be >= {minimum}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{ENV_PREFIX}{name} must be a boolean, got {raw!r}")


#: Room for the JSON fields around a value or a run's inputs in one request body.
_BODY_ENVELOPE_BYTES = 65_536
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _csv(raw: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (raw or "").split(",") if item.strip())


#: ``DSPEX_REDIS_TLS_VERIFY`` values (redis-py's ``ssl_cert_reqs`` strings).
TLS_VERIFY_MODES = ("required", "optional", "none")


def _sentinel_hosts(raw: str | None) -> tuple[tuple[str, int], ...]:
    """Parse ``DSPEX_REDIS_SENTINELS`` (``host:port,host:port``; ``[v6]:port`` too)."""
    hosts: list[tuple[str, int]] = []
    for item in (raw or "").split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"DSPEX_REDIS_SENTINELS must be host:port[,host:port...], got {item!r}"
            )
        hosts.append((host, int(port)))
    return tuple(hosts)


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def _sentinel_url(sentinels: tuple[tuple[str, int], ...], template: str) -> str:
    """Celery's ``sentinel://h1:p1/db;sentinel://h2:p2/db`` for ``sentinels``, with the
    credentials and db of ``template`` (the store URL)."""
    parts = urlsplit(template)
    userinfo, at, _ = parts.netloc.rpartition("@")
    db = parts.path if parts.path not in ("", "/") else "/0"
    chunks = []
    for host, port in sentinels:
        shown = f"[{host}]" if ":" in host else host
        chunks.append(f"sentinel://{userinfo}{at}{shown}:{port}{db}")
    return ";".join(chunks)


@dataclass(frozen=True)
class Settings:
    """Every setting of the service, frozen. Build it once with :meth:`from_env`."""

    redis_url: str = "redis://localhost:6379/0"
    broker_url: str = ""
    result_backend: str = ""
    key_prefix: str = "dspex"
    session_ttl_s: int = 3600
    #: Native Redis expiry lands this long after a session's deadline (backstop for beat).
    expiry_grace_s: int = 300
    expiry_interval_s: float = 30.0
    max_sessions: int | None = None
    global_program_ttl_s: int = 3600
    max_value_bytes: int = 1_048_576
    max_inputs_bytes: int = 1_048_576
    max_result_bytes: int = 4_194_304
    lm_default_model: str | None = None
    lm_profiles: Mapping[str, LMProfileConfig] = field(default_factory=dict)
    tool_modules: tuple[str, ...] = ()
    #: Worker modules that register compile metrics with ``@metric`` (metrics.py).
    metric_modules: tuple[str, ...] = ()
    #: Versions a program keeps, the current one included (compile jobs, DESIGN.md §12).
    program_history: int = 10
    #: Largest stored dataset or inline trainset/valset, JSON-encoded.
    max_dataset_bytes: int = 4_194_304
    task_time_limit_s: int = 300
    task_soft_time_limit_s: int = 270
    task_max_retries: int = 5
    result_expires_s: int = 86_400
    idempotency_ttl_s: int = 3600
    #: Approximate length of each session's event stream (0 turns events off).
    events_maxlen: int = 1000
    #: Versions a variable keeps by default, the current one included (0: none).
    variable_history: int = 10
    #: How long a streamed run's event stream is kept after the run ends.
    stream_keep_s: int = 600
    #: Resend a Client's task still unfinished this long after it was sent (0: derived,
    #: see resend_after_s). The task ledger is off with DSPEX_TASK_LEDGER=false.
    resend_after_override_s: int = 0
    task_ledger: bool = True
    worker_pool: str = "threads"
    worker_concurrency: int = 32
    flower_address: str = "127.0.0.1"
    flower_port: int = 5555
    flower_user: str = "admin"
    flower_password: Secret = field(default_factory=lambda: Secret(""))
    #: Let Flower start without basic auth (UI open, API locked): loopback-only dev use.
    flower_allow_no_auth: bool = False
    socket_timeout_s: float = 5.0
    #: 0 derives it from the time limit (see visibility_timeout_s).
    visibility_timeout_override_s: int = 0
    #: TLS client options for every ``rediss://`` connection (store, broker, backend).
    redis_tls_ca_file: str | None = None
    redis_tls_cert_file: str | None = None
    redis_tls_key_file: str | None = None
    #: Server certificate check: required | optional | none.
    redis_tls_verify: str = "required"
    #: Redis Sentinel: ``((host, port), ...)`` and the name of the monitored master.
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str | None = None
    #: Password of the sentinels themselves (``requirepass`` in sentinel.conf), if any.
    redis_sentinel_password: Secret = field(default_factory=lambda: Secret(""))
    #: The store talks to a Redis Cluster (broker and result backend cannot).
    redis_cluster: bool = False
    #: The HTTP API (``dspex-tasks api``): where it listens.
    api_address: str = "127.0.0.1"
    api_port: int = 8000
    #: SHA-256 digests (lowercase hex) of the accepted bearer tokens; none: no auth, and
    #: the API refuses to listen beyond loopback.
    api_token_digests: tuple[str, ...] = ()
    #: Origins allowed to call the API from a browser (CORS); none: CORS off.
    api_cors_origins: tuple[str, ...] = ()
    #: Threads the API's routes run their (synchronous) store and broker calls in.
    api_threads: int = 8
    #: Largest request body the API reads (0: derived, see api_body_limit_bytes).
    api_max_body_override_bytes: int = 0

    def __post_init__(self) -> None:
        self._check_topology()
        # Broker and result backend default to the store URL: one Redis is the simple case.
        if not self.broker_url and self.redis_sentinels:
            # ... or, with Sentinel, the same monitored master through Celery's sentinel://.
            object.__setattr__(
                self, "broker_url", _sentinel_url(self.redis_sentinels, self.redis_url)
            )
        if not self.broker_url:
            object.__setattr__(self, "broker_url", self.redis_url)
        if not self.result_backend:
            object.__setattr__(self, "result_backend", self.broker_url)
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ConfigError(
                "DSPEX_TASK_SOFT_TIME_LIMIT_S must be below DSPEX_TASK_TIME_LIMIT_S "
                f"({self.task_soft_time_limit_s} >= {self.task_time_limit_s})"
            )
        if self.session_ttl_s <= 0:
            raise ConfigError("DSPEX_SESSION_TTL_S must be positive")
        if self.worker_pool not in {"threads", "prefork", "solo", "gevent"}:
            raise ConfigError(
                f"DSPEX_WORKER_POOL must be threads|prefork|solo|gevent, got {self.worker_pool!r}"
            )
        self._check_tls()
        for digest in self.api_token_digests:
            if not _SHA256_HEX.fullmatch(digest):
                # Never echo the value: it may be a token pasted where its digest belongs.
                raise ConfigError(
                    "DSPEX_API_TOKENS must be comma-separated SHA-256 digests "
                    "(64 lowercase hex characters each), not the tokens themselves"
                )

    def _check_topology(self) -> None:
        """Sentinel / Cluster / URL checks (before the broker defaults are derived)."""
        if _scheme(self.redis_url) not in {"redis", "rediss", "unix"}:
            raise ConfigError(
                "DSPEX_REDIS_URL must be a redis://, rediss:// or unix:// URL, got "
                f"{mask_url(self.redis_url)!r}"
            )
        for name, url in (("BROKER_URL", self.broker_url), ("RESULT_BACKEND", self.result_backend)):
            if _scheme(url) == "sentinel" and not self.redis_sentinel_master:
                raise ConfigError(
                    f"DSPEX_{name} is a sentinel:// URL: set DSPEX_REDIS_SENTINEL_MASTER"
                )
        if self.redis_sentinels and not self.redis_sentinel_master:
            raise ConfigError("DSPEX_REDIS_SENTINELS is set: set DSPEX_REDIS_SENTINEL_MASTER too")
        if self.redis_sentinel_master and not (
            self.redis_sentinels
            or _scheme(self.broker_url) == "sentinel"
            or _scheme(self.result_backend) == "sentinel"
        ):
            raise ConfigError(
                "DSPEX_REDIS_SENTINEL_MASTER is set but DSPEX_REDIS_SENTINELS is empty"
            )
        if self.redis_cluster:
            if self.redis_sentinels:
                raise ConfigError(
                    "DSPEX_REDIS_CLUSTER and DSPEX_REDIS_SENTINELS exclude each other"
                )
            if not self.broker_url or self.broker_url == self.redis_url:
                raise ConfigError(
                    "DSPEX_REDIS_CLUSTER=true: set DSPEX_BROKER_URL to a non-cluster Redis "
                    "(Celery's Redis broker and result backend do not support Redis Cluster)"
                )
            if urlsplit(self.redis_url).path not in ("", "/", "/0"):
                raise ConfigError("DSPEX_REDIS_URL: a Redis Cluster has only database 0")

    def _check_tls(self) -> None:
        if self.redis_tls_verify not in TLS_VERIFY_MODES:
            raise ConfigError(
                f"DSPEX_REDIS_TLS_VERIFY must be one of {'|'.join(TLS_VERIFY_MODES)}, "
                f"got {self.redis_tls_verify!r}"
            )
        files = {
            "REDIS_TLS_CA_FILE": self.redis_tls_ca_file,
            "REDIS_TLS_CERT_FILE": self.redis_tls_cert_file,
            "REDIS_TLS_KEY_FILE": self.redis_tls_key_file,
        }
        for name, path in files.items():
            if path and not os.path.isfile(path):
                raise ConfigError(f"DSPEX_{name}: no such file {path!r}")
        if self.redis_tls_key_file and not self.redis_tls_cert_file:
            raise ConfigError("DSPEX_REDIS_TLS_KEY_FILE is set: set DSPEX_REDIS_TLS_CERT_FILE too")
        uses_tls = self.store_tls or self.broker_tls or self.backend_tls
        if not uses_tls and (any(files.values()) or self.redis_tls_verify != "required"):
            # Almost certainly a forgotten rediss://: refuse to talk plain text silently.
            set_names = [f"DSPEX_{n}" for n, v in files.items() if v]
            if self.redis_tls_verify != "required":
                set_names.append("DSPEX_REDIS_TLS_VERIFY")
            raise ConfigError(f"{', '.join(set_names)} set, but no Redis URL uses TLS (rediss://)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``); ``overrides`` win."""
        env = _Env(os.environ if environ is None else environ)
        redis_url = env.text("REDIS_URL", cls.redis_url)
        assert redis_url is not None
        time_limit = env.req_int("TASK_TIME_LIMIT_S", cls.task_time_limit_s, minimum=1)
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "broker_url": env.text("BROKER_URL", "") or "",
            "result_backend": env.text("RESULT_BACKEND", "") or "",
            "key_prefix": env.text("KEY_PREFIX", cls.key_prefix),
            "session_ttl_s": env.req_int("SESSION_TTL_S", cls.session_ttl_s, minimum=1),
            "expiry_grace_s": env.req_int("EXPIRY_GRACE_S", cls.expiry_grace_s),
            "expiry_interval_s": env.number(
                "EXPIRY_INTERVAL_S", cls.expiry_interval_s, minimum=0.1
            ),
            "max_sessions": env.integer("MAX_SESSIONS", None, minimum=1),
            "global_program_ttl_s": env.req_int(
                "GLOBAL_PROGRAM_TTL_S", cls.global_program_ttl_s, minimum=1
            ),
            "max_value_bytes": env.req_int("MAX_VALUE_BYTES", cls.max_value_bytes, minimum=64),
            "max_inputs_bytes": env.req_int("MAX_INPUTS_BYTES", cls.max_inputs_bytes, minimum=64),
            "max_result_bytes": env.req_int("MAX_RESULT_BYTES", cls.max_result_bytes, minimum=64),
            "lm_default_model": env.text("LM"),
            "lm_profiles": _lm_profiles(env.text("LM_PROFILES"), env.text("LM")),
            "tool_modules": tuple(
                m.strip() for m in (env.text("TOOL_MODULES") or "").split(",") if m.strip()
            ),
            "metric_modules": tuple(
                m.strip() for m in (env.text("METRIC_MODULES") or "").split(",") if m.strip()
            ),
            "program_history": env.req_int("PROGRAM_HISTORY", cls.program_history, minimum=1),
            "max_dataset_bytes": env.req_int(
                "MAX_DATASET_BYTES", cls.max_dataset_bytes, minimum=64
            ),
            "task_time_limit_s": time_limit,
            "task_soft_time_limit_s": env.req_int(
                "TASK_SOFT_TIME_LIMIT_S", max(1, time_limit - max(1, time_limit // 10))
            ),
            "task_max_retries": env.req_int("TASK_MAX_RETRIES", cls.task_max_retries),
            "result_expires_s": env.req_int("RESULT_EXPIRES_S", cls.result_expires_s, minimum=1),
            "idempotency_ttl_s": env.req_int("IDEMPOTENCY_TTL_S", cls.idempotency_ttl_s, minimum=1),
            "events_maxlen": env.req_int("EVENTS_MAXLEN", cls.events_maxlen, minimum=0),
            "variable_history": env.req_int("VARIABLE_HISTORY", cls.variable_history, minimum=0),
            "stream_keep_s": env.req_int("STREAM_KEEP_S", cls.stream_keep_s, minimum=1),
            "resend_after_override_s": env.req_int("RESEND_AFTER_S", 0, minimum=0),
            "task_ledger": env.flag("TASK_LEDGER", True),
            "worker_pool": env.text("WORKER_POOL", cls.worker_pool),
            "worker_concurrency": env.req_int(
                "WORKER_CONCURRENCY", cls.worker_concurrency, minimum=1
            ),
            "flower_address": env.text("FLOWER_ADDRESS", cls.flower_address),
            "flower_port": env.req_int("FLOWER_PORT", cls.flower_port, minimum=1),
            "flower_user": env.text("FLOWER_USER", cls.flower_user),
            "flower_password": Secret(env.text("FLOWER_PASSWORD", "") or ""),
            "flower_allow_no_auth": env.flag("FLOWER_ALLOW_NO_AUTH", False),
            "socket_timeout_s": env.number("SOCKET_TIMEOUT_S", cls.socket_timeout_s, minimum=0.1),
            "visibility_timeout_override_s": env.req_int("VISIBILITY_TIMEOUT_S", 0, minimum=0),
            "redis_tls_ca_file": env.text("REDIS_TLS_CA_FILE"),
            "redis_tls_cert_file": env.text("REDIS_TLS_CERT_FILE"),
            "redis_tls_key_file": env.text("REDIS_TLS_KEY_FILE"),
            "redis_tls_verify": (env.text("REDIS_TLS_VERIFY", "required") or "").lower(),
            "redis_sentinels": _sentinel_hosts(env.text("REDIS_SENTINELS")),
            "redis_sentinel_master": env.text("REDIS_SENTINEL_MASTER"),
            "redis_sentinel_password": Secret(env.text("REDIS_SENTINEL_PASSWORD", "") or ""),
            "redis_cluster": env.flag("REDIS_CLUSTER", False),
            "api_address": env.text("API_ADDRESS", cls.api_address),
            "api_port": env.req_int("API_PORT", cls.api_port, minimum=1),
            "api_token_digests": _csv(env.text("API_TOKENS")),
            "api_cors_origins": _csv(env.text("API_CORS_ORIGINS")),
            "api_max_body_override_bytes": env.req_int("API_MAX_BODY_BYTES", 0, minimum=0),
            "api_threads": env.req_int("API_THREADS", cls.api_threads, minimum=1),
        }
        values.update(overrides)
        return cls(**values)

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {"redis_url", "broker_url", "result_backend"}:
                value = mask_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def store_tls(self) -> bool:
        """Whether the store connects with TLS (``rediss://``)."""
        return _scheme(self.redis_url) == "rediss"

    def _url_tls(self, url: str) -> bool:
        # sentinel:// URLs carry no TLS flag: with Sentinel, TLS follows DSPEX_REDIS_URL.
        scheme = _scheme(url)
        return scheme == "rediss" or (scheme == "sentinel" and self.store_tls)

    @property
    def broker_tls(self) -> bool:
        return self._url_tls(self.broker_url)

    @property
    def backend_tls(self) -> bool:
        return self._url_tls(self.result_backend)

    @property
    def visibility_timeout_s(self) -> int:
        """Broker visibility timeout: by default longer than the hard time limit, so a
        slow task is never handed to a second worker while it still runs."""
        return self.visibility_timeout_override_s or self.task_time_limit_s * 2 + 60

    @property
    def resend_after_s(self) -> int:
        """When the sweep sends a Client's unfinished task again (store/ledger.py).

        By default long enough that a message still queued or in flight comes back by
        itself first: twice the visibility timeout plus the time limit. A resend while
        the original still exists only costs a duplicate delivery that answers the first
        run's result.
        """
        return self.resend_after_override_s or (
            self.visibility_timeout_s * 2 + self.task_time_limit_s
        )

    @property
    def api_body_limit_bytes(self) -> int:
        """Largest request body the HTTP API reads: by default the store's own limits
        (a value, a run's inputs) plus room for the JSON around them, so anything the
        store would accept fits and anything far beyond is refused before it is read."""
        return self.api_max_body_override_bytes or (
            max(self.max_value_bytes, self.max_inputs_bytes) + _BODY_ENVELOPE_BYTES
        )

    @property
    def claim_lease_s(self) -> int:
        """Lease of a running task's claim (its holder renews it every third of it).

        At most the visibility timeout (30 s cap), so when a killed worker's message comes
        back the dead holder's claim has lapsed and the new delivery runs the task; a
        delivery that finds a live claim waits for it to finish or lapse.
        """
        return max(5, min(30, self.visibility_timeout_s))
