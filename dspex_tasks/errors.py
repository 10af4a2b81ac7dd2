"""The one error tree of dspex-tasks.

Every error is a :class:`DspexError` with a stable ``code``; callers match on the code,
never on the message. The classes survive a trip through Celery's JSON result format:
Celery records ``exc_module``/``exc_type``/``exc_message`` (our ``args``) and the producer
rebuilds the same class with ``cls(*args)``, so every constructor takes
``(message, details=None)`` and nothing else.

``args`` is the wire form ``(message, {"code": code, "details": details})``: the code is
in the JSON itself, so a producer without this package (plain Celery, or Flower's API)
reads ``exc_message[1]["code"]``, where Celery can only rebuild a stand-in class
(``celery.exceptions.SessionNotFound``) with the same ``args``. A constructor given that
wire form as ``details`` unwraps it, which is how ``cls(*args)`` rebuilds the original.

    DspexError
    ├── ConfigError                   invalid_settings
    ├── SessionError
    │   ├── InvalidSessionId          invalid_session_id
    │   ├── SessionNotFound           session_not_found
    │   │   └── SessionExpired        session_expired
    │   ├── SessionExists             session_exists
    │   └── SessionQuotaExceeded      session_quota_exceeded
    ├── VariableError
    │   ├── VariableNotFound          variable_not_found
    │   ├── VariableExists            variable_exists
    │   ├── UnknownType               unknown_type
    │   ├── ValidationFailed          validation_failed
    │   ├── VersionConflict           version_conflict
    │   └── HistoryUnavailable        history_unavailable
    ├── RunError
    │   ├── SessionBusy               session_busy
    │   ├── RunCancelled              run_cancelled
    │   └── RunNotFound               run_not_found
    ├── ProgramError
    │   ├── ProgramNotFound           program_not_found
    │   ├── InvalidProgram            invalid_program
    │   ├── InvalidInputs             invalid_inputs
    │   ├── ToolNotFound              tool_not_found
    │   ├── OptimizationInProgress    optimization_in_progress
    │   └── DatasetNotFound           dataset_not_found
    ├── LMFailure
    │   ├── UnknownLMProfile          unknown_lm_profile
    │   ├── LMError                   lm_error
    │   ├── LMRateLimited             lm_rate_limited   (retryable)
    │   └── BudgetExceeded            budget_exceeded
    ├── TaskTimeout                   task_timeout
    ├── PayloadTooLarge               payload_too_large
    ├── DuplicateDelivery             duplicate_delivery
    ├── StoreUnavailable              store_unavailable (retryable)
    └── HttpError                     (the HTTP API's own, dspex_tasks/gateway)
        ├── Unauthorized              unauthorized
        ├── RouteNotFound             not_found
        └── MethodNotAllowed          method_not_allowed
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "RETRYABLE_ERRORS",
    "BudgetExceeded",
    "ConfigError",
    "DatasetNotFound",
    "DspexError",
    "DuplicateDelivery",
    "HistoryUnavailable",
    "HttpError",
    "InvalidInputs",
    "InvalidProgram",
    "InvalidSessionId",
    "LMError",
    "LMFailure",
    "LMRateLimited",
    "MethodNotAllowed",
    "OptimizationInProgress",
    "PayloadTooLarge",
    "ProgramError",
    "ProgramNotFound",
    "RouteNotFound",
    "RunCancelled",
    "RunError",
    "RunNotFound",
    "SessionBusy",
    "SessionError",
    "SessionExists",
    "SessionExpired",
    "SessionNotFound",
    "SessionQuotaExceeded",
    "StoreUnavailable",
    "TaskTimeout",
    "ToolNotFound",
    "Unauthorized",
    "UnknownLMProfile",
    "UnknownType",
    "ValidationFailed",
    "VariableError",
    "VariableExists",
    "VariableNotFound",
    "VersionConflict",
    "error_from_code",
]


class DspexError(Exception):
    """Base of every error the service raises on purpose."""

    code = "dspex_error"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        plain = _unwrap(details)
        # The wire form goes into ``args``: Celery's JSON result carries it, a producer
        # without this package reads the code from it, and ``cls(*args)`` rebuilds this.
        super().__init__(message, {"code": self.code, "details": plain})
        self.message = message
        self.details: dict[str, Any] = plain

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape used by the CLI and the HTTP path."""
        return {"code": self.code, "message": self.message, "details": self.details}


class ConfigError(DspexError):
    """Raised when a setting is missing or invalid at start-up."""

    code = "invalid_settings"


# --- sessions -------------------------------------------------------------------------


class SessionError(DspexError):
    """Base of session lifecycle errors."""


class InvalidSessionId(SessionError):
    """Raised when a session id breaks the id rule (1-128 chars of [A-Za-z0-9_.:@-])."""

    code = "invalid_session_id"


class SessionNotFound(SessionError):
    """Raised when no session has this id."""

    code = "session_not_found"


class SessionExpired(SessionNotFound):
    """Raised when the session's deadline passed before the sweep removed it."""

    code = "session_expired"


class SessionExists(SessionError):
    """Raised when creating a session whose id is taken, without ``exist_ok``."""

    code = "session_exists"


class SessionQuotaExceeded(SessionError):
    """Raised when ``DSPEX_MAX_SESSIONS`` live sessions already exist."""

    code = "session_quota_exceeded"


# --- variables ------------------------------------------------------------------------


class VariableError(DspexError):
    """Base of variable errors."""


class VariableNotFound(VariableError):
    """Raised when a session has no variable with this name or id."""

    code = "variable_not_found"


class VariableExists(VariableError):
    """Raised when registering a variable whose name is taken in the session."""

    code = "variable_exists"


class UnknownType(VariableError):
    """Raised when a variable type was never registered."""

    code = "unknown_type"


class ValidationFailed(VariableError):
    """Raised when a value breaks its type or a constraint (or constraints are malformed)."""

    code = "validation_failed"


class VersionConflict(VariableError):
    """Raised when ``expected_version`` differs from the stored version."""

    code = "version_conflict"


class HistoryUnavailable(VariableError):
    """Raised when a rollback names a version the variable's history did not keep."""

    code = "history_unavailable"


# --- programs and tasks ---------------------------------------------------------------


class ProgramError(DspexError):
    """Base of program and task-input errors."""


class ProgramNotFound(ProgramError):
    """Raised when a stored program does not exist."""

    code = "program_not_found"


class InvalidProgram(ProgramError):
    """Raised when a program spec or signature cannot be built."""

    code = "invalid_program"


class RunError(DspexError):
    """Base of the errors about runs (a task on a session) and their coordination."""


class SessionBusy(RunError):
    """Raised when the session's ``reject`` strategy refuses a run while another is
    queued or running."""

    code = "session_busy"


class RunCancelled(RunError):
    """Raised when a run was cancelled, interrupted or rolled back before it finished."""

    code = "run_cancelled"


class RunNotFound(RunError):
    """Raised when a run id names no run of the session."""

    code = "run_not_found"


class InvalidInputs(ProgramError):
    """Raised when task inputs or options are missing, extra or of the wrong type."""

    code = "invalid_inputs"


class ToolNotFound(ProgramError):
    """Raised when a program names a tool the worker has not registered."""

    code = "tool_not_found"


class OptimizationInProgress(ProgramError):
    """Raised when a write targets a program a compile run holds the lock of (without
    ``force=True``)."""

    code = "optimization_in_progress"


class DatasetNotFound(ProgramError):
    """Raised when a compile names a stored dataset the session does not have."""

    code = "dataset_not_found"


# --- language models ------------------------------------------------------------------


class LMFailure(DspexError):
    """Base of language-model errors."""


class UnknownLMProfile(LMFailure):
    """Raised when a session names an LM profile the worker does not have."""

    code = "unknown_lm_profile"


class LMError(LMFailure):
    """Raised when the LM call failed or its output could not be parsed."""

    code = "lm_error"


class LMRateLimited(LMFailure):
    """Raised when the LM provider throttled the call; the task retries with backoff."""

    code = "lm_rate_limited"


class BudgetExceeded(LMFailure):
    """Raised when a run starts after its session spent ``max_tokens_total``; not retried."""

    code = "budget_exceeded"


# --- task limits ----------------------------------------------------------------------


class TaskTimeout(DspexError):
    """Raised when a task's run passes its soft time limit (e.g. a hung LM endpoint).

    Not retried: a retry of a hung endpoint would hold a worker slot for another whole
    limit. The session is unchanged (the run's outputs are dropped, nothing is written).
    """

    code = "task_timeout"


# --- transport ------------------------------------------------------------------------


class PayloadTooLarge(DspexError):
    """Raised when a value, task input or result is over its configured size limit."""

    code = "payload_too_large"


class DuplicateDelivery(DspexError):
    """Raised when a redelivered task finds its own earlier run still in progress."""

    code = "duplicate_delivery"


class StoreUnavailable(DspexError):
    """Raised when Redis cannot be reached; retryable."""

    code = "store_unavailable"


# --- the HTTP API ---------------------------------------------------------------------


class HttpError(DspexError):
    """Base of the errors only the HTTP API raises (no Python call can hit them)."""


class Unauthorized(HttpError):
    """Raised when a request to the HTTP API has no bearer token, or an unknown one."""

    code = "unauthorized"


class RouteNotFound(HttpError):
    """Raised when a request names a path the HTTP API does not serve."""

    code = "not_found"


class MethodNotAllowed(HttpError):
    """Raised when a request uses a method its path does not accept."""

    code = "method_not_allowed"


def _unwrap(details: dict[str, Any] | None) -> dict[str, Any]:
    """The details inside a wire form ``{"code", "details"}``, else a copy of ``details``.

    The class decides the code (``cls(*args)`` rebuilds the class that was raised).

    Plain details never have exactly these two keys with these types: every detail key
    the service sets names what went wrong (``session_id``, ``variable``, ``rule``, ...).
    """
    if (
        isinstance(details, dict)
        and details.keys() == {"code", "details"}
        and isinstance(details["code"], str)
        and isinstance(details["details"], dict)
    ):
        return dict(details["details"])
    return dict(details or {})


#: Errors a task retries with backoff; everything else fails at once.
RETRYABLE_ERRORS: tuple[type[DspexError], ...] = (StoreUnavailable, LMRateLimited)


def _all_subclasses(cls: type[DspexError]) -> list[type[DspexError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


# Sub-bases (SessionError, ...) inherit their parent's code; only classes that declare
# their own code are addressable by it.
_BY_CODE: dict[str, type[DspexError]] = {
    c.code: c for c in _all_subclasses(DspexError) if "code" in vars(c)
}


def error_from_code(code: str, message: str, details: dict[str, Any] | None = None) -> DspexError:
    """Rebuild an error from its wire form (``code`` + message), e.g. from Flower's API."""
    return _BY_CODE.get(code, DspexError)(message, details)
