"""Request bodies of the ``/v1`` routes (pydantic, for validation and the OpenAPI doc).

Strict and closed: a wrong JSON type or an unknown field is ``invalid_inputs`` (422),
not a silent coercion. Values themselves (a variable's value, a run's inputs) are
checked by the store and the signature, as for a Python caller.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CancelRun",
    "CreateSession",
    "PutProgram",
    "RegisterVariable",
    "RunAccepted",
    "StartRun",
    "UpdateVariable",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateSession(_Body):
    session_id: str | None = Field(None, description="1-128 of A-Z a-z 0-9 _ . : @ - (random)")
    ttl_s: float | None = Field(None, description="sliding TTL in seconds (server default)")
    metadata: dict[str, Any] | None = None


class RegisterVariable(_Body):
    name: str
    type: str = Field(description="float integer string boolean choice module embedding tensor")
    value: Any
    constraints: dict[str, Any] | None = None
    description: str | None = None
    metadata: dict[str, Any] | None = None
    history: int | None = Field(None, description="versions kept, the current one included")


class UpdateVariable(_Body):
    value: Any
    expected_version: int | None = Field(None, description="compare-and-set: version_conflict")
    metadata: dict[str, Any] | None = Field(None, description="merged; null values delete keys")


class PutProgram(_Body):
    module: str = Field(description="predict, chain_of_thought, react, ...")
    signature: str | dict[str, Any]
    config: dict[str, Any] | None = None
    state: dict[str, Any] | None = None


class StartRun(_Body):
    task: str = Field(description="predict | chain_of_thought | program | compile")
    signature: str | dict[str, Any] | None = Field(None, description="predict, chain_of_thought")
    program_id: str | None = Field(None, description="program, compile")
    inputs: dict[str, Any] = Field(default_factory=dict)
    trainset: list[dict[str, Any]] | None = Field(None, description="compile: the examples")
    options: dict[str, Any] | None = Field(
        None, description='e.g. {"stream": true, "multitask": "reject"}'
    )


class CancelRun(_Body):
    action: str = Field("interrupt", description="interrupt (writes kept) | rollback")


class RunAccepted(BaseModel):
    run_id: str
    session_id: str
