"""The webhook senders' side of Redis: the stream of events, one consumer group of senders.

A sender touches the events it holds (sending, or waiting between retries), so another API
process takes over only the events of a sender that died: each event goes out once.
"""

from __future__ import annotations

from typing import Any

import redis

from app.jobs.contract import Notification
from app.jobs.keys import WEBHOOK_GROUP, WEBHOOKS, job_key
from app.jobs.store import Store


class WebhookStore(Store):
    def notifications(
        self, consumer: str, count: int, block_ms: int, reclaim_idle_ms: int, own: bool = False
    ) -> list[Notification]:
        """Webhook events to send: with `own`, those this sender took before a restart;
        otherwise those a sender that died left idle for `reclaim_idle_ms`, then new ones."""
        try:
            if own:
                entries = self._read(consumer, "0", count, None)
            else:
                claimed: Any = self._r.xautoclaim(
                    WEBHOOKS, WEBHOOK_GROUP, consumer, reclaim_idle_ms, count=count
                )
                entries = claimed[1] or self._read(consumer, ">", count, block_ms)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._r.xgroup_create(WEBHOOKS, WEBHOOK_GROUP, id="0", mkstream=True)
            return []
        return [
            Notification(e.decode(), fields[b"job"].decode(), fields[b"event"].decode())
            for e, fields in entries
            if fields
        ]

    def _read(self, consumer: str, start: str, count: int, block_ms: int | None) -> Any:
        reply: Any = self._r.xreadgroup(
            WEBHOOK_GROUP, consumer, {WEBHOOKS: start}, count=count, block=block_ms
        )
        return reply[0][1] if reply else []

    def hold(self, consumer: str, entry_ids: list[str]) -> None:
        """Keep the events this sender holds from looking abandoned."""
        if entry_ids:
            self._r.xclaim(WEBHOOKS, WEBHOOK_GROUP, consumer, 0, list[Any](entry_ids), justid=True)

    def webhook_target(self, job_id: str) -> tuple[str, str] | None:
        """The job's webhook URL and owner; None when the record is gone."""
        hook: Any = self._r.hmget(job_key(job_id), ["webhook", "owner"])
        url, owner = hook
        return (url.decode(), (owner or b"").decode()) if url else None

    def notified(self, notification: Notification) -> None:
        """Done with an event (sent, or given up on): acked and deleted, nothing piles up."""
        tx = self._r.pipeline(transaction=True)
        tx.xack(WEBHOOKS, WEBHOOK_GROUP, notification.entry_id)
        tx.xdel(WEBHOOKS, notification.entry_id)
        tx.execute()
