"""``dspex-tasks runs SID`` (a session's runs, newest first) and ``dspex-tasks cancel
RUN_ID`` (stop one; ``--rollback`` also undoes what it wrote)."""

from __future__ import annotations

import argparse

from dspex_tasks.cli.output import Reply
from dspex_tasks.client import Client

__all__ = ["add_cancel_arguments", "add_runs_arguments", "cancel", "runs"]


def add_runs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_id", metavar="SID")
    p.add_argument("--status", help="only runs with this status")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")


def add_cancel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--session", dest="session_id", metavar="SID", help="the run's session")
    p.add_argument(
        "--rollback", action="store_true", help="also undo the run's writes (status rolled_back)"
    )


def runs(args: argparse.Namespace, client: Client) -> Reply:
    found = client.session(args.session_id).runs(status=args.status, limit=args.limit)
    docs = [r.to_dict() for r in found]
    lines = [
        f"{r.id}  {r.status:<11}  {r.task:<22}  {r.created_at.isoformat(timespec='seconds')}"
        + (f"  {r.error_code}" if r.error_code else "")
        for r in found
    ]
    return Reply({"session_id": args.session_id, "runs": docs}, "\n".join(lines) or "no runs")


def cancel(args: argparse.Namespace, client: Client) -> Reply:
    action = "rollback" if args.rollback else "interrupt"
    outcome = client.cancel(args.run_id, action, session_id=args.session_id)
    return Reply({"run_id": args.run_id, "outcome": outcome}, f"run {args.run_id}: {outcome}")
