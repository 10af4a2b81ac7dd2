"""``dspex-tasks usage SID``: a session's LM usage and token budget (DESIGN.md §11)."""

from __future__ import annotations

import argparse

from dspex_tasks.cli.output import Reply
from dspex_tasks.client import Client

__all__ = ["add_usage_arguments", "usage"]


def add_usage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_id", metavar="SID")


def usage(args: argparse.Namespace, client: Client) -> Reply:
    session = client.store.configure_session(args.session_id)
    doc = {**session.usage, "max_tokens_total": session.max_tokens_total}
    width = max(len(k) for k in doc)
    return Reply(doc, "\n".join(f"{k:<{width}}  {v}" for k, v in doc.items()))
