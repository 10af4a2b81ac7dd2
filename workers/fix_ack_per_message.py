"""Message acknowledgements in batches: one Redis round trip per event-loop turn.

kombu's Redis transport emulates acknowledgements with an "unacked" hash and its index
(a sorted set): delivering a message records it there, acknowledging it removes it, one
``MULTI``/``ZREM``/``HDEL``/``EXEC`` pipeline per message. Profiled on an LM-bound worker
at 64 concurrent tasks, those acknowledgements were ~16 % of the worker's CPU, the second
cost after recording the delivery itself.

Here an acknowledgement made while the worker's event loop runs is kept (kombu's own
bookkeeping is done at once) and every acknowledgement kept since the loop's last turn
is sent at the start of its next turn, in one pipeline: ``ZREM index tag...`` and ``HDEL
unacked tag...``. A turn of a busy loop handles several finished tasks, so several
acknowledgements share one round trip; an idle loop sends each on its next turn, a few
milliseconds later. Acknowledgements still kept when a channel closes (warm shutdown)
are sent before kombu restores the channel's unacknowledged messages.

What is at stake is what the visibility timeout already covers: a message whose
acknowledgement is lost (the worker killed between the task's end and the next turn, or
Redis unreachable) is delivered again after ``DSPEX_VISIBILITY_TIMEOUT_S``, and the new
delivery finds its task's result recorded (``store/taskstate.py``) and answers it without
running the task again.

Without an event loop on the transport (a consumer outside a worker) acknowledgements
go at once, as before.

Upstream: kombu 5.7's Redis QoS acknowledges each message in its own transaction (no
issue filed that we know of).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

__all__ = ["install", "send_kept_acks"]

log = logging.getLogger(__name__)

_MARK = "_dspex_batched"
#: Set on a transport once an event loop turns for it: acknowledgements can wait a turn.
_LOOP_FLAG = "_dspex_ack_on_tick"
#: A QoS's acknowledgements kept for the next turn (delivery tags).
_KEPT = "_dspex_kept_acks"

_lock = threading.Lock()
_kept_by: set[Any] = set()  # the QoS objects with acknowledgements kept


def _take(qos: Any) -> list[Any]:
    """``qos``'s kept acknowledgements, now no longer kept. Call with ``_lock`` held."""
    _kept_by.discard(qos)
    tags: list[Any] = qos.__dict__.pop(_KEPT, [])
    return tags


def _send(qos: Any, tags: list[Any]) -> None:
    try:
        with qos.channel.conn_or_acquire() as client:
            pipe = client.pipeline()
            pipe.zrem(qos.unacked_index_key, *tags)
            pipe.hdel(qos.unacked_key, *tags)
            pipe.execute()
    except Exception as e:  # any failure: the visibility timeout brings them back
        log.warning(
            "cannot acknowledge %d message(s) (%s): they come back after the visibility "
            "timeout, and their tasks answer the results they recorded",
            len(tags),
            e,
        )


def send_kept_acks() -> None:
    """Send every acknowledgement kept in this process (the event loop's tick)."""
    with _lock:
        batches = [(qos, _take(qos)) for qos in list(_kept_by)]
    for qos, tags in batches:
        if tags:
            _send(qos, tags)


def install() -> None:
    """Patch kombu's Redis QoS and transport once per process (idempotent)."""
    qos_class: Any = kombu_redis.QoS
    transport_class: Any = kombu_redis.Transport
    if getattr(qos_class.ack, _MARK, False):
        return
    ack: Callable[..., Any] = qos_class.ack
    restore_unacked_once: Callable[..., Any] = qos_class.restore_unacked_once
    register: Callable[..., Any] = transport_class.register_with_event_loop
    local_ack: Callable[..., Any] = virtual.QoS.ack

    def batched_ack(self: Any, delivery_tag: Any) -> None:
        transport = getattr(self.channel, "connection", None)
        if not getattr(transport, _LOOP_FLAG, False) or getattr(transport, "client", None) is None:
            ack(self, delivery_tag)
            return
        with _lock:
            self.__dict__.setdefault(_KEPT, []).append(delivery_tag)
            _kept_by.add(self)
        local_ack(self, delivery_tag)  # kombu's own bookkeeping, at once

    def flushing_restore_unacked_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _lock:
            tags = _take(self)
        if tags:
            _send(self, tags)
        return restore_unacked_once(self, *args, **kwargs)

    def register_with_event_loop(self: Any, connection: Any, loop: Any) -> Any:
        result = register(self, connection, loop)
        loop.on_tick.add(send_kept_acks)  # a set: one entry however often it reconnects
        setattr(self, _LOOP_FLAG, True)
        return result

    for name, patched in (
        ("ack", batched_ack),
        ("restore_unacked_once", flushing_restore_unacked_once),
    ):
        setattr(patched, _MARK, True)
        setattr(qos_class, name, patched)
    transport_class.register_with_event_loop = register_with_event_loop
