"""The LM settings a session (and so a producer) may choose: a profile name and safe params.

Pure validation shared by producers and workers. Endpoints, keys and models are worker
configuration and can never come from here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from dspex_tasks.errors import ValidationFailed

__all__ = ["SAFE_LM_PARAMS", "validate_lm_params", "validate_lm_settings"]

PROFILE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _number(low: float, high: float) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number")
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return check


def _int(low: int, high: int) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return check


def _stop(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or len(value) > 8
        or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in value)
    ):
        raise ValueError("must be a string or a list of up to 8 strings (1-64 chars)")
    return value


#: Parameter -> validator returning the normalized value (raises ValueError).
SAFE_LM_PARAMS: Mapping[str, Any] = {
    "temperature": _number(0.0, 2.0),
    "top_p": _number(0.0, 1.0),
    "max_tokens": _int(1, 128_000),
    "n": _int(1, 16),
    "stop": _stop,
}


def validate_lm_params(params: Mapping[str, Any], *, source: str = "LM settings") -> dict[str, Any]:
    """Validate safe LM parameters; unknown names (api_base, api_key, model...) are refused."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        check = SAFE_LM_PARAMS.get(name)
        if check is None:
            raise ValidationFailed(
                f"{source}: parameter {name!r} cannot be set by a session "
                f"(allowed: {', '.join(SAFE_LM_PARAMS)})",
                {"rule": "lm_param", "param": str(name)},
            )
        if value is None:
            continue
        try:
            out[name] = check(value)
        except ValueError as e:
            raise ValidationFailed(
                f"{source}: {name} {e}, got {value!r}", {"rule": "lm_param", "param": name}
            ) from None
    return out


def validate_lm_settings(profile: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """The session's ``lm`` record: ``{"profile": name, "params": {...}}``."""
    if not isinstance(profile, str) or not PROFILE_RE.fullmatch(profile):
        raise ValidationFailed(f"invalid LM profile name {profile!r}", {"rule": "lm_profile"})
    return {"profile": profile, "params": validate_lm_params(params)}
