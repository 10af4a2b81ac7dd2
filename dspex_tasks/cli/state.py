"""State commands of ``dspex-tasks``: ``session``, ``var``, ``stats`` and ``expire``.

Each command takes the parsed arguments and an open :class:`~dspex_tasks.client.Client`
and returns a :class:`~dspex_tasks.cli.output.Reply` (a JSON document and its text form)
for sessions, their typed variables and the programs stored in them, and the store's
counters and expiry sweep; ``main`` picks the command and prints the reply.
"""

from __future__ import annotations

import argparse
from typing import Any

from dspex_tasks.cli.output import Reply, UsageError, dumps, parse_json_arg, parse_value
from dspex_tasks.client import Client
from dspex_tasks.errors import VariableNotFound

__all__ = ["expire", "session", "stats", "var"]


def _session_text(doc: dict[str, Any]) -> str:
    lines = [
        f"session {doc['id']}",
        f"  created    {doc['created_at']}",
        f"  accessed   {doc['last_accessed']}",
        f"  expires    {doc['expires_at']}  (ttl {doc['ttl_s']:g} s, sliding)",
    ]
    if doc.get("metadata"):
        lines.append(f"  metadata   {dumps(doc['metadata'])}")
    if doc.get("lm"):
        lines.append(f"  lm         {dumps(doc['lm'])}")
    if "variables" in doc:
        shown = ", ".join(f"{k}={dumps(v)}" for k, v in doc["variables"].items())
        lines.append(f"  variables  {shown or '-'}")
    if "programs" in doc:
        lines.append(f"  programs   {', '.join(doc['programs']) or '-'}")
    return "\n".join(lines)


def session(args: argparse.Namespace, client: Client) -> Reply:
    action = args.action
    if action == "create":
        metadata = parse_json_arg(args.metadata, "--metadata") if args.metadata else None
        handle = client.create_session(
            args.session_id, ttl_s=args.ttl, metadata=metadata, exist_ok=args.exist_ok
        )
        doc = handle.info().to_dict()
        return Reply(doc, _session_text(doc))
    if action == "show":
        session = client.store.get_session(args.session_id, touch=not args.no_touch)
        doc = session.to_dict()
        variables = client.store.list_variables(args.session_id)
        doc["variables"] = {v.name: v.to_dict()["value"] for v in variables}
        doc["programs"] = client.store.list_programs(args.session_id)
        return Reply(doc, _session_text(doc))
    if action == "list":
        ids = client.list_sessions()
        return Reply({"sessions": ids}, "\n".join(ids) if ids else "(no sessions)")
    deleted = client.delete_session(args.session_id)
    text = f"deleted {args.session_id}" if deleted else f"{args.session_id}: no such session"
    return Reply({"session_id": args.session_id, "deleted": deleted}, text)


def _var_text(doc: dict[str, Any]) -> str:
    return f"{doc['name']} = {dumps(doc['value'])}  ({doc['type']}, version {doc['version']})"


def var(args: argparse.Namespace, client: Client) -> Reply:
    sid = args.session_id
    if args.action == "set":
        if args.type:
            constraints = (
                parse_json_arg(args.constraints, "--constraints") if args.constraints else None
            )
            var = client.store.register_variable(
                sid,
                args.name,
                args.type,
                parse_value(args.value, args.type),
                constraints=constraints,
                description=args.description,
            )
        else:
            if args.constraints or args.description:
                raise UsageError("--constraints and --description need --type (registration)")
            try:
                current = client.store.get_variable(sid, args.name)
            except VariableNotFound as e:
                e.message += " (pass --type to register it)"
                raise
            var = client.store.update_variable(
                sid,
                args.name,
                parse_value(args.value, current.type),
                expected_version=args.expected_version,
            )
        doc = var.to_dict()
        return Reply(doc, _var_text(doc))
    if args.action == "get":
        doc = client.store.get_variable(sid, args.name).to_dict()
        return Reply(doc, _var_text(doc))
    docs = [v.to_dict() for v in client.store.list_variables(sid, args.pattern)]
    text = "\n".join(_var_text(d) for d in docs) if docs else "(no variables)"
    return Reply({"session_id": sid, "variables": docs}, text)


def stats(args: argparse.Namespace, client: Client) -> Reply:
    doc = client.stats()
    last = client.store.last_sweep_at()
    doc["last_sweep_at"] = last.isoformat() if last else None
    width = max(len(k) for k in doc)
    return Reply(doc, "\n".join(f"{k:<{width}}  {v}" for k, v in doc.items()))


def expire(args: argparse.Namespace, client: Client) -> Reply:
    expired = client.store.expire_sessions(limit=args.limit)
    return Reply({"expired": expired}, f"expired {expired} session(s)")
