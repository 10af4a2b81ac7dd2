"""Table tests for dspex_tasks.settings: DSPEX_* parsing, defaults, derived values, masking."""

from __future__ import annotations

from typing import Any

import pytest

from dspex_tasks.errors import ConfigError
from dspex_tasks.settings import Secret, Settings, mask_url

URL = "redis://127.0.0.1:6379/0"


def _from(**env: str) -> Settings:
    return Settings.from_env(environ={"DSPEX_REDIS_URL": URL, **env})


@pytest.mark.parametrize(
    ("attr", "expected"),
    [
        ("redis_url", URL),
        ("broker_url", URL),
        ("result_backend", URL),
        ("key_prefix", "dspex"),
        ("session_ttl_s", 3600),
        ("expiry_grace_s", 300),
        ("expiry_interval_s", 30.0),
        ("max_sessions", None),
        ("task_time_limit_s", 300),
        ("task_soft_time_limit_s", 270),
        ("task_max_retries", 5),
        ("task_ledger", True),
        ("worker_pool", "threads"),
        ("worker_concurrency", 32),
        ("flower_port", 5555),
        ("flower_allow_no_auth", False),
        ("redis_tls_verify", "required"),
        ("redis_cluster", False),
        ("tool_modules", ()),
        ("visibility_timeout_s", 660),
        ("resend_after_s", 1620),
        ("claim_lease_s", 30),
    ],
)
def test_defaults(attr: str, expected: Any) -> None:
    assert getattr(_from(), attr) == expected


@pytest.mark.parametrize(
    ("env", "attr", "expected"),
    [
        ({"DSPEX_KEY_PREFIX": "app1"}, "key_prefix", "app1"),
        ({"DSPEX_SESSION_TTL_S": "60"}, "session_ttl_s", 60),
        ({"DSPEX_EXPIRY_INTERVAL_S": "0.5"}, "expiry_interval_s", 0.5),
        ({"DSPEX_MAX_SESSIONS": "10"}, "max_sessions", 10),
        ({"DSPEX_TASK_TIME_LIMIT_S": "100"}, "task_soft_time_limit_s", 90),
        ({"DSPEX_TASK_TIME_LIMIT_S": "5"}, "task_soft_time_limit_s", 4),
        ({"DSPEX_TASK_TIME_LIMIT_S": "100"}, "visibility_timeout_s", 260),
        ({"DSPEX_TASK_TIME_LIMIT_S": "100"}, "resend_after_s", 620),
        ({"DSPEX_TASK_TIME_LIMIT_S": "2"}, "task_soft_time_limit_s", 1),
        ({"DSPEX_VISIBILITY_TIMEOUT_S": "2"}, "claim_lease_s", 5),
        ({"DSPEX_VISIBILITY_TIMEOUT_S": "12"}, "claim_lease_s", 12),
        ({"DSPEX_VISIBILITY_TIMEOUT_S": "12"}, "resend_after_s", 324),
        ({"DSPEX_RESEND_AFTER_S": "7"}, "resend_after_s", 7),
        ({"DSPEX_TASK_LEDGER": "off"}, "task_ledger", False),
        ({"DSPEX_TASK_LEDGER": "YES"}, "task_ledger", True),
        ({"DSPEX_FLOWER_ALLOW_NO_AUTH": " 1 "}, "flower_allow_no_auth", True),
        ({"DSPEX_TOOL_MODULES": " a.b , ,c "}, "tool_modules", ("a.b", "c")),
        (
            {"DSPEX_REDIS_URL": "rediss://h:1/0", "DSPEX_REDIS_TLS_VERIFY": "NONE"},
            "redis_tls_verify",
            "none",
        ),
        ({"DSPEX_BROKER_URL": "redis://b:1/2"}, "broker_url", "redis://b:1/2"),
        ({"DSPEX_BROKER_URL": "redis://b:1/2"}, "result_backend", "redis://b:1/2"),
        ({"DSPEX_RESULT_BACKEND": "redis://r:1/3"}, "result_backend", "redis://r:1/3"),
    ],
)
def test_environment_values(env: dict[str, str], attr: str, expected: Any) -> None:
    assert getattr(_from(**env), attr) == expected


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"DSPEX_SESSION_TTL_S": "soon"}, "DSPEX_SESSION_TTL_S must be an integer, got 'soon'"),
        ({"DSPEX_SESSION_TTL_S": "0"}, "DSPEX_SESSION_TTL_S must be >= 1, got 0"),
        ({"DSPEX_MAX_VALUE_BYTES": "63"}, "DSPEX_MAX_VALUE_BYTES must be >= 64"),
        ({"DSPEX_EXPIRY_INTERVAL_S": "fast"}, "DSPEX_EXPIRY_INTERVAL_S must be a number"),
        ({"DSPEX_EXPIRY_INTERVAL_S": "0.01"}, "DSPEX_EXPIRY_INTERVAL_S must be >= 0.1"),
        ({"DSPEX_TASK_LEDGER": "maybe"}, "DSPEX_TASK_LEDGER must be a boolean"),
        ({"DSPEX_WORKER_POOL": "eventlet"}, "DSPEX_WORKER_POOL must be threads|prefork"),
        (
            {"DSPEX_TASK_TIME_LIMIT_S": "10", "DSPEX_TASK_SOFT_TIME_LIMIT_S": "10"},
            "DSPEX_TASK_SOFT_TIME_LIMIT_S must be below DSPEX_TASK_TIME_LIMIT_S",
        ),
        ({"DSPEX_REDIS_URL": "http://x"}, "DSPEX_REDIS_URL must be a redis://"),
        ({"DSPEX_REDIS_TLS_VERIFY": "maybe"}, "DSPEX_REDIS_TLS_VERIFY must be one of"),
        ({"DSPEX_REDIS_TLS_VERIFY": "none"}, "but no Redis URL uses TLS"),
        ({"DSPEX_REDIS_SENTINELS": "h1"}, "DSPEX_REDIS_SENTINELS must be host:port"),
        ({"DSPEX_REDIS_SENTINELS": "h1:1"}, "set DSPEX_REDIS_SENTINEL_MASTER too"),
        ({"DSPEX_REDIS_SENTINEL_MASTER": "m"}, "DSPEX_REDIS_SENTINELS is empty"),
        ({"DSPEX_REDIS_CLUSTER": "true"}, "DSPEX_REDIS_CLUSTER=true: set DSPEX_BROKER_URL"),
        ({"DSPEX_LM_PROFILES": "{"}, "DSPEX_LM_PROFILES is not valid JSON"),
        ({"DSPEX_LM_PROFILES": "[]"}, "must be a JSON object of named profiles"),
        ({"DSPEX_LM_PROFILES": '{"a": {}}'}, "DSPEX_LM_PROFILES['a'] needs a string 'model'"),
        (
            {"DSPEX_LM_PROFILES": '{"a": {"model": "m", "api_key": "k"}}'},
            "DSPEX_LM_PROFILES['a'] has unknown keys: ['api_key']",
        ),
        (
            {"DSPEX_LM_PROFILES": '{"a": {"model": "m", "params": 1}}'},
            "DSPEX_LM_PROFILES['a'].params must be an object",
        ),
    ],
)
def test_bad_environment_is_invalid_settings(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        _from(**env)
    assert info.value.code == "invalid_settings"
    assert fragment in info.value.message


def test_lm_profiles_are_parsed() -> None:
    profiles = _from(
        DSPEX_LM_PROFILES=(
            '{"fast": {"model": "openai/x", "api_base": "http://lm:8000/v1",'
            ' "api_key_env": "LM_KEY", "params": {"temperature": 0.2}}}'
        )
    ).lm_profiles
    fast = profiles["fast"]
    assert (fast.name, fast.model, fast.api_base, fast.api_key_env) == (
        "fast",
        "openai/x",
        "http://lm:8000/v1",
        "LM_KEY",
    )
    assert dict(fast.params) == {"temperature": 0.2}


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("rediss://user:pw@h/2", "rediss://user:***@h/2"),
        ("redis://u:pw@[::1]:6380/0", "redis://u:***@[::1]:6380/0"),
        (
            "sentinel://:a@h1:26379/0;sentinel://:b@h2:26380/0",
            "sentinel://:***@h1:26379/0;sentinel://:***@h2:26380/0",
        ),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize("value", ["s3cret", "x"])
def test_secret_never_shows_its_value(value: str) -> None:
    secret = Secret(value)
    assert secret.get() == value
    assert value not in repr(secret) and value not in str(secret)
    assert bool(secret) and not Secret("")
    assert secret == Secret(value) and secret != Secret(value + "!")


def test_settings_repr_hides_passwords() -> None:
    settings = _from(
        DSPEX_REDIS_URL="redis://:storepw@h:1/0",
        DSPEX_BROKER_URL="redis://:brokerpw@h:1/1",
        DSPEX_FLOWER_PASSWORD="flowerpw",
    )
    shown = repr(settings)
    for secret in ("storepw", "brokerpw", "flowerpw"):
        assert secret not in shown
    assert "redis://:***@h:1/0" in shown and settings.flower_password.get() == "flowerpw"


@pytest.mark.parametrize(
    ("env", "tls"),
    [
        ({}, (False, False, False)),
        ({"DSPEX_REDIS_URL": "rediss://h:1/0"}, (True, True, True)),
        (
            {"DSPEX_BROKER_URL": "rediss://b:1/0", "DSPEX_REDIS_TLS_VERIFY": "none"},
            (False, True, True),
        ),
    ],
)
def test_tls_follows_each_url(env: dict[str, str], tls: tuple[bool, bool, bool]) -> None:
    s = _from(**env)
    assert (s.store_tls, s.broker_tls, s.backend_tls) == tls


# --- the HTTP API -------------------------------------------------------------------------

DIGEST_A = "a" * 64
DIGEST_B = "0123456789abcdef" * 4


def test_api_settings() -> None:
    s = Settings.from_env(
        {
            "DSPEX_API_ADDRESS": "0.0.0.0",
            "DSPEX_API_PORT": "9000",
            "DSPEX_API_TOKENS": f"{DIGEST_A}, {DIGEST_B},",
            "DSPEX_API_CORS_ORIGINS": "https://a.example,https://b.example",
            "DSPEX_API_THREADS": "4",
        }
    )
    assert s.api_threads == 4
    assert (s.api_address, s.api_port) == ("0.0.0.0", 9000)
    assert s.api_token_digests == (DIGEST_A, DIGEST_B)
    assert s.api_cors_origins == ("https://a.example", "https://b.example")
    # The body limit follows the store's limits unless set.
    defaults = Settings.from_env({"DSPEX_MAX_INPUTS_BYTES": "2000000"})
    assert defaults.api_body_limit_bytes == 2_000_000 + 65_536
    assert defaults.api_token_digests == () and defaults.api_cors_origins == ()
    assert Settings.from_env({"DSPEX_API_MAX_BODY_BYTES": "5000"}).api_body_limit_bytes == 5000


@pytest.mark.parametrize("raw", ["my-secret-token", "A" * 64, "a" * 63, f"{DIGEST_A},not-a-digest"])
def test_api_tokens_must_be_digests_and_are_never_echoed(raw: str) -> None:
    with pytest.raises(ConfigError, match="SHA-256 digests") as caught:
        Settings.from_env({"DSPEX_API_TOKENS": raw})
    assert "my-secret-token" not in str(caught.value) and "not-a-digest" not in str(caught.value)
