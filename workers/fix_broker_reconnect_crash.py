"""Guards for Celery 5.7 / kombu 5.7 crashes when the Redis broker connection drops.

When the broker connection is lost while tasks are in flight, Celery's consumer
``collect()``s the broken connection (which drops the transport's ``client``), closes it
and reconnects on a new one. Two calls then still reach the old channel and try to
build a Redis client from the dropped transport, raising ``AttributeError`` (``'NoneType'
object has no attribute 'hostname'`` / ``'client'``), which escapes kombu's
``ignore_errors`` and ``ack_log_error`` (they only swallow connection errors) and kills
the worker with "Unrecoverable error" instead of letting it carry on:

1. closing the old channel restores its unacknowledged messages;
2. a task that was running during the outage finishes later and acknowledges (or
   rejects) its message on the old channel.

Found by ``tests/test_faults.py::test_redis_restart_under_load`` (every worker with a
task in flight died on the first Redis restart).

The guards skip the Redis part of those calls when the channel's transport is gone, and
keep kombu's local bookkeeping. Nothing is lost: the messages stay in the broker's
unacked index, from which any worker restores them once the visibility timeout passes;
the redelivered task finds its claim finished and answers the first run's result (see
``dspex_tasks/store/taskstate.py``), so it is not run twice.

Upstream: the same ``_connparams`` AttributeError on a dropped transport is kombu issue
#582 ("Error on restarting Gossip"), closed without a fix for this path; still present in
kombu 5.7.0. Remove this module when kombu's channel stops using a collected transport.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

__all__ = ["install"]

log = logging.getLogger(__name__)
_MARK = "_dspex_guarded"


def _transport_gone(qos: Any) -> bool:
    transport = getattr(qos.channel, "connection", None)
    return transport is None or getattr(transport, "client", None) is None


def install() -> None:
    """Patch kombu's Redis QoS once per process (idempotent)."""
    qos = kombu_redis.QoS
    if getattr(qos.restore_unacked, _MARK, False):
        return
    restore_unacked: Callable[..., Any] = qos.restore_unacked
    ack: Callable[..., Any] = qos.ack
    reject: Callable[..., Any] = qos.reject
    local_ack: Callable[..., Any] = virtual.QoS.ack  # kombu's bookkeeping only

    def guarded_restore_unacked(self: Any, client: Any = None) -> Any:
        if client is None and _transport_gone(self):
            log.warning(
                "broker connection already closed: %d unacknowledged message(s) stay in "
                "the unacked index and come back after the visibility timeout",
                len(self._delivered),
            )
            self._delivered.clear()
            return None
        return restore_unacked(self, client)

    def guarded_ack(self: Any, delivery_tag: Any) -> None:
        if _transport_gone(self):
            log.warning(
                "cannot acknowledge message %s on a closed broker connection: it comes "
                "back after the visibility timeout (its task's result is kept)",
                delivery_tag,
            )
            local_ack(self, delivery_tag)
            return
        ack(self, delivery_tag)

    def guarded_reject(self: Any, delivery_tag: Any, requeue: bool = False) -> None:
        if _transport_gone(self):
            log.warning(
                "cannot reject message %s on a closed broker connection: it comes back "
                "after the visibility timeout",
                delivery_tag,
            )
            local_ack(self, delivery_tag)
            return
        reject(self, delivery_tag, requeue=requeue)

    for name, guard in (
        ("restore_unacked", guarded_restore_unacked),
        ("ack", guarded_ack),
        ("reject", guarded_reject),
    ):
        setattr(guard, _MARK, True)
        setattr(qos, name, guard)
