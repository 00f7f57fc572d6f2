"""Webhooks: a job's state changes POSTed, signed, to the URL its request gave.

The finishing (and starting) Lua scripts queue an event in a Redis stream when the job's webhook
wants it; a sender thread in each API process takes events from that stream (one consumer group,
so each event goes out once across replicas, and a dead sender's events are taken over) and
POSTs them, retrying with backoff.

Signature, for receivers: `Webhook-Signature: v1=<hex>`, the HMAC-SHA256 with the server's
`SDSERVE_WEBHOOK_SECRET` of `<Webhook-Timestamp>.<raw body>`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
import redis

from app.jobs import JobStore, Notification

log = logging.getLogger("sdserve.webhooks")

ATTEMPTS = 6  # first try, then after 1, 2, 4, 8 and 16 seconds
SEND_TIMEOUT_S = 10.0
RECLAIM_IDLE_MS = 120_000  # a sender silent this long is gone: its events are taken over


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def refusal(url: str, allow_private: bool) -> str | None:
    """Why this URL is no place to send to, or None. Private, loopback, link-local and other
    special addresses are refused unless allowed: a webhook must not reach inside the network
    the server runs in (SSRF)."""
    host = urlsplit(url).hostname
    if not host:
        return "the URL has no host"
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return f"{host} does not resolve"
    if allow_private:
        return None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            return f"{host} is a private, loopback or link-local address ({address})"
    return None


class WebhookSender:
    def __init__(self, store: JobStore, secret: bytes, allow_private: bool, consumer: str) -> None:
        self.store = store
        self.secret = secret
        self.allow_private = allow_private
        self.consumer = consumer
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook")
        self._reader = threading.Thread(target=self._read_loop, name="webhooks", daemon=True)
        self._http = httpx.Client(timeout=SEND_TIMEOUT_S, follow_redirects=False)

    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        self._stopping.set()
        self._reader.join()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _read_loop(self) -> None:
        own = True  # first, what this sender took before a restart
        while not self._stopping.is_set():
            try:
                events = self.store.notifications(self.consumer, 16, 1000, RECLAIM_IDLE_MS, own)
            except redis.RedisError as e:
                log.warning("webhooks: redis unavailable: %s", e)
                self._stopping.wait(2)
                continue
            own = False
            for event in events:
                self._pool.submit(self._deliver, event)

    def _deliver(self, event: Notification) -> None:
        try:
            if self._send(event):
                self.store.notified(event)
            # else cut short by a stop: left pending, for this sender's next start or a takeover
        except redis.RedisError as e:  # left pending: taken over, and sent, later
            log.warning("webhooks: redis unavailable: %s", e, extra={"job_id": event.job_id})

    def _send(self, event: Notification) -> bool:
        """Send with retries; True when done with the event (sent, refused or given up on),
        False when a stop cut the retries short."""
        target = self.store.webhook_target(event.job_id)
        view = self.store.view(event.job_id, target[1]) if target else None
        if target is None or view is None:
            return True  # the record expired meanwhile: nothing left to tell
        url = target[0]
        body = json.dumps(
            {
                "id": event.entry_id,
                "type": f"job.{event.event}",
                "created_at": datetime.now(UTC).isoformat(),
                "data": json.loads(view.model_dump_json()),
            }
        ).encode()
        extra = {"job_id": event.job_id}
        for attempt in range(ATTEMPTS):
            if attempt and self._stopping.wait(2 ** (attempt - 1)):  # backoff; or stopping
                return False
            reason = refusal(url, self.allow_private)  # again: DNS may have changed
            if reason:
                log.warning("webhook not sent: %s", reason, extra=extra)
                return True
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "Webhook-Id": event.entry_id,
                "Webhook-Timestamp": timestamp,
                "Webhook-Signature": sign(self.secret, timestamp, body),
            }
            try:
                response = self._http.post(url, content=body, headers=headers)
                if response.is_success:
                    log.info("webhook %s sent", event.event, extra=extra)
                    return True
                log.warning(
                    "webhook %s: answered %d", event.event, response.status_code, extra=extra
                )
            except httpx.HTTPError as e:
                log.warning("webhook %s: %s", event.event, e, extra=extra)
        log.error("webhook %s given up after %d attempts", event.event, ATTEMPTS, extra=extra)
        return True
