"""LM profiles -> DSPy LM objects (worker side only).

A profile is worker configuration (``DSPEX_LM`` / ``DSPEX_LM_PROFILES``): model, endpoint,
the *name* of the environment variable holding the key, default params and a request
timeout (``timeout_s``, default 120, capped by the task's soft time limit). A session picks
a profile by name and safe params; bound variables (a session variable named
``temperature``, ``max_tokens``, ``top_p``, ``stop`` or ``n``) override those. Producers
never send endpoints or keys.

LM objects are built once and reused: the base LM per profile, and one copy per distinct
parameter set (a small LRU). The API key is read from the environment on every resolve
and is part of the cache key, so a rotated key takes effect without a restart.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from dspex_tasks.errors import UnknownLMProfile
from dspex_tasks.lm.engines import local as local_lm
from dspex_tasks.lm.engines.echo import EchoEngine
from dspex_tasks.lm.params import SAFE_LM_PARAMS, validate_lm_params
from dspex_tasks.lm.traffic import Gate, LMTraffic, TrafficLM
from dspex_tasks.lru import LRU
from dspex_tasks.settings import LMProfileConfig

__all__ = [
    "BUILTIN_ENGINES",
    "ECHO_MODEL",
    "LOCAL_MODEL",
    "LMRegistry",
    "bound_params",
    "memoize_model_metadata",
    "snapshot_proxy_environment",
]

log = logging.getLogger(__name__)

ECHO_MODEL = "dspex/echo"
LOCAL_MODEL = local_lm.LOCAL_MODEL
#: Models served in-process by an engine of ours rather than a provider client.
#: ``dspex/local`` loads its model (llama_cpp) only on the first call.
BUILTIN_ENGINES: dict[str, Callable[[LMProfileConfig], Any]] = {
    ECHO_MODEL: lambda profile: EchoEngine(),
    LOCAL_MODEL: lambda profile: local_lm.LocalEngine(),
}
_MAX_LM_COPIES = 256
_MAX_METADATA_ENTRIES = 1024


def memoize_model_metadata() -> bool:
    """Make DSPy's per-call price lookup O(1) in this process (idempotent).

    After every LM call DSPy estimates its cost with
    ``dspy.clients.model_metadata.model_info(provider, model)``, which walks the whole
    LiteLLM price map (~4,900 entries, with a deep copy) whenever the model is not a
    direct hit -- every self-hosted, proxied or fine-tuned model name. Profiled on a
    worker calling an OpenAI-compatible endpoint, that walk was a quarter of the CPU of
    an LM-bound task. The map is loaded once and never changes afterwards, so the answer
    for ``(provider, model, namespaces)`` never changes either: remember it (bounded) and
    hand out a deep copy, as the original does. Returns False if DSPy's internals moved
    (nothing is patched then).
    """
    try:
        from dspy.clients import capabilities, costs
    except ImportError:  # pragma: no cover - a DSPy without these modules
        return False

    def memoized(original: Callable[..., Any]) -> Callable[..., Any]:
        memo: dict[tuple[Any, ...], Any] = {}
        lock = threading.Lock()

        def model_info(provider: Any, model: Any, *, namespaces: Any = None) -> Any:
            key = (provider, model, None if namespaces is None else tuple(namespaces))
            try:
                found = memo.get(key)
            except TypeError:  # unhashable arguments: not worth remembering
                return original(provider, model, namespaces=namespaces)
            if found is None:
                found = original(provider, model, namespaces=namespaces)
                with lock:
                    if len(memo) >= _MAX_METADATA_ENTRIES:
                        memo.clear()
                    memo[key] = found
            return copy.deepcopy(found)

        return model_info

    original = getattr(costs, "model_info", None)
    if not _patch_once(costs, "model_info", memoized):
        return False
    if getattr(capabilities, "model_info", None) is original:
        capabilities.model_info = costs.model_info
    return True


def snapshot_proxy_environment() -> bool:
    """Read this process's proxy settings once rather than on every LM request
    (idempotent).

    DSPy's HTTP transport asks urllib's ``getproxies()`` before each request, which
    decodes every variable of the process environment: ~0.9 ms of profiled worker CPU
    per LM call, 7 % of an LM-bound task. A worker's environment is fixed when it starts
    (like its LM profiles) and nothing a task does changes it, so the first answer is
    kept for the life of the process; a worker started with ``HTTPS_PROXY`` still goes
    through that proxy. Returns False if DSPy's internals moved (nothing is patched
    then).
    """
    try:
        # By name: the vendored package ships type marks that would make mypy read DSPy.
        _proxy = importlib.import_module("dspy._vendor.lm15.transports._proxy")
    except ImportError:  # pragma: no cover - a DSPy without this transport
        return False

    def snapshotted(original: Callable[[], dict[str, str]]) -> Callable[[], dict[str, str]]:
        snapshot: list[dict[str, str]] = []

        def getproxies() -> dict[str, str]:
            if not snapshot:
                snapshot.append(dict(original()))
            return dict(snapshot[0])  # a copy: callers may not share the snapshot

        return getproxies

    return _patch_once(_proxy, "getproxies", snapshotted)


def _patch_once(module: Any, name: str, wrap: Callable[[Any], Callable[..., Any]]) -> bool:
    """Replace the function ``module.<name>`` with ``wrap(it)``, once per process.

    Returns False, patching nothing, when there is no such function (DSPy's internals
    moved); True when it is patched, now or before.
    """
    original = getattr(module, name, None)
    if original is None or not callable(original):
        return False
    if getattr(original, "_dspex_patched", False):
        return True
    patched = wrap(original)
    patched._dspex_patched = True  # type: ignore[attr-defined]
    setattr(module, name, patched)
    return True


def bound_params(variables: Mapping[str, Any]) -> dict[str, Any]:
    """LM params driven by session variables named after them (validated)."""
    values = {name: var.value for name, var in variables.items() if name in SAFE_LM_PARAMS}
    return validate_lm_params(values, source="bound variable")


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


class LMRegistry:
    """Builds and caches LM objects for the worker's profiles."""

    def __init__(
        self,
        profiles: Mapping[str, LMProfileConfig],
        *,
        environ: Mapping[str, str] | None = None,
        max_timeout_s: float | None = None,
        traffic: LMTraffic | None = None,
    ) -> None:
        """``max_timeout_s`` caps every profile's request timeout (the task's soft limit:
        a request may never outlive the task that made it). ``traffic`` enforces the
        profiles' ``limits`` and ``cache`` through Redis (``lm/traffic.py``)."""
        memoize_model_metadata()
        snapshot_proxy_environment()
        self.max_timeout_s = max_timeout_s
        self._profiles = dict(profiles)
        local = local_lm.available()
        if local and "local" not in self._profiles:
            self._profiles["local"] = LMProfileConfig(name="local", model=LOCAL_MODEL)
        if "default" not in self._profiles:
            if local:
                log.warning(
                    "no DSPEX_LM configured: the default profile is the embedded offline "
                    "model %r (SmolLM2-135M: well-formed, typed answers of low quality)",
                    LOCAL_MODEL,
                )
                self._profiles["default"] = LMProfileConfig(name="default", model=LOCAL_MODEL)
            else:
                log.warning(
                    "no DSPEX_LM configured: the default profile is the offline deterministic "
                    "LM %r (answers are placeholders, not model output; install the "
                    "local-lm extra for a real offline model)",
                    ECHO_MODEL,
                )
                self._profiles["default"] = LMProfileConfig(name="default", model=ECHO_MODEL)
        self._environ = os.environ if environ is None else environ
        self._installed: dict[str, Any] = {}
        self._cache: LRU[tuple[Any, ...], Any] = LRU(_MAX_LM_COPIES)
        self._lock = threading.Lock()
        self.traffic = traffic
        self._gates: dict[str, Gate] = {}

    def profile_config(self, name: str) -> LMProfileConfig | None:
        """The configuration of profile ``name`` (None for an installed LM or none)."""
        return self._profiles.get(name)

    def _gate(self, profile: LMProfileConfig, retries: int) -> Gate:
        with self._lock:
            gate = self._gates.get(profile.name)
            if gate is None:
                gate = self.traffic.gate(profile, retries) if self.traffic else Gate(profile.name)
                self._gates[profile.name] = gate
            return gate

    @property
    def profile_names(self) -> list[str]:
        return sorted({*self._profiles, *self._installed})

    def install(self, name: str, lm: Any) -> None:
        """Serve profile ``name`` with a ready LM object (tests, embedding applications)."""
        with self._lock:
            self._installed[name] = lm
            self._cache.clear()

    def model_of(self, name: str) -> str:
        if name in self._installed:
            return str(getattr(self._installed[name], "model", name))
        return self._profile(name).model

    def _profile(self, name: str) -> LMProfileConfig:
        profile = self._profiles.get(name)
        if profile is None:
            raise UnknownLMProfile(
                f"this worker has no LM profile {name!r} "
                f"(profiles: {', '.join(self.profile_names)})",
                {"profile": name},
            )
        return profile

    def _key(self, profile: LMProfileConfig) -> str | None:
        return self._environ.get(profile.api_key_env) if profile.api_key_env else None

    def _build(self, profile: LMProfileConfig, api_key: str | None) -> Any:
        params = dict(profile.params)
        engine_factory = BUILTIN_ENGINES.get(profile.model)
        if engine_factory is not None:
            lm = TrafficLM(profile.model, engine=engine_factory(profile), cache=False, **params)
            lm._dspex_gate = self._gate(profile, 0)
            return lm
        # Without a timeout an endpoint that accepts the request and never answers
        # holds the calling thread for ever. (Our in-process engines refuse one.)
        params["timeout"] = min(profile.timeout_s, self.max_timeout_s or profile.timeout_s)
        if profile.api_base:
            params["api_base"] = profile.api_base
        if api_key:
            params["api_key"] = api_key
        retries = int(params.get("num_retries", 3))
        if profile.cache is not None:
            params["cache"] = False  # the shared cache replaces the process's own
        if profile.limits is not None:
            params["num_retries"] = 0  # the gate retries, through the limiter
        lm = TrafficLM(profile.model, **params)
        lm._dspex_gate = self._gate(profile, retries)
        return lm

    def resolve(self, lm_settings: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
        """The LM for a session's settings plus bound-variable overrides.

        The session's params are validated again here: producers write the session
        record directly, so a record written around ``set_session_lm`` must not make the
        worker send its key to another endpoint (``api_base``) or model.

        Raises:
            UnknownLMProfile: the session names a profile this worker does not have.
            ValidationFailed: the session's LM params include an unsafe or invalid one.
        """
        name = str(lm_settings.get("profile") or "default")
        session_params = lm_settings.get("params") or {}
        if not isinstance(session_params, Mapping):
            session_params = {"params": session_params}  # refused below, by name
        params = {
            **validate_lm_params(session_params, source="session LM settings"),
            **overrides,
        }
        frozen = tuple(sorted((k, _freeze(v)) for k, v in params.items()))
        with self._lock:
            installed = self._installed.get(name)
        if installed is not None:
            key_fp = ""
            base_key: tuple[Any, ...] = ("installed", name, id(installed))
        else:
            profile = self._profile(name)
            api_key = self._key(profile)
            # A digest, not the key, so the cache never holds the secret twice.
            key_fp = hashlib.sha256((api_key or "").encode()).hexdigest()[:16]
            base_key = ("profile", name, key_fp)
        lm = self._cache.get((*base_key, frozen))
        if lm is not None:
            return lm
        base = self._cache.get((*base_key, ()))
        if base is None:
            base = installed if installed is not None else self._build(profile, api_key)
        lm = base.copy(**params) if params else base
        self._cache.put_many({(*base_key, ()): base, (*base_key, frozen): lm})
        return lm
