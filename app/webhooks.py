"""Webhooks: a job's state changes POSTed, signed, to the URL its request gave.

The finishing (and starting) Lua scripts queue an event in a Redis stream when the job's webhook
wants it; a sender thread in each API process takes events from that stream (one consumer group,
so each event goes out once across replicas, and a dead sender's events are taken over) and
POSTs them, retrying with backoff. A sender holds at most `BACKLOG` events at once (it reads no
more until one is done) and renews its hold on them, so no other sender takes over an event
that is still on its way: each event is sent once.

The address a webhook is sent to is the one that was checked: the host is resolved, every
answer checked, and the connection made to a checked address (the URL's host still names the
server for `Host` and TLS), so a DNS answer that changes in between (rebinding) reaches nothing
inside.

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
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis

from app.jobs.api_store import ApiStore
from app.jobs.contract import Notification
from app.jobs.webhook_store import WebhookStore

log = logging.getLogger("sdserve.webhooks")

ATTEMPTS = 6  # first try, then after 1, 2, 4, 8 and 16 seconds
SEND_TIMEOUT_S = 10.0
RECLAIM_IDLE_MS = 120_000  # a sender silent this long is gone: its events are taken over
HOLD_EVERY_S = 20.0  # how often a sender renews its hold on the events it has
BACKLOG = 64  # events one sender holds at once (sending or waiting to retry)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def resolve(url: str, allow_private: bool) -> tuple[str | None, str | None]:
    """(a checked address to connect to, None), or (None, why this URL is no place to send
    to). Private, loopback, link-local and other special addresses are refused unless
    allowed: a webhook must not reach inside the network the server runs in (SSRF)."""
    host = urlsplit(url).hostname
    if not host:
        return None, "the URL has no host"
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return None, f"{host} does not resolve"
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not allow_private:
        for address in addresses:
            if not address.is_global:
                return None, f"{host} is a private, loopback or link-local address ({address})"
    return str(addresses[0]), None


def refusal(url: str, allow_private: bool) -> str | None:
    """Why this URL is no place to send to, or None."""
    return resolve(url, allow_private)[1]


def pinned(url: str, address: str) -> str:
    """The URL with its host replaced by the checked address (the port kept)."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


class WebhookSender:
    def __init__(
        self,
        events: WebhookStore,
        jobs: ApiStore,
        secret: bytes,
        allow_private: bool,
        consumer: str,
    ) -> None:
        self.events = events
        self.jobs = jobs
        self.secret = secret
        self.allow_private = allow_private
        self.consumer = consumer
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook")
        self._reader = threading.Thread(target=self._read_loop, name="webhooks", daemon=True)
        self._http = httpx.Client(timeout=SEND_TIMEOUT_S, follow_redirects=False)
        self._lock = threading.Lock()
        self._held: set[str] = set()  # entry ids in hand: sending, or waiting to retry
        self._room = threading.Semaphore(BACKLOG)

    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        self._stopping.set()
        self._reader.join()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def backlog(self) -> int:
        with self._lock:
            return len(self._held)

    def _read_loop(self) -> None:
        own = True  # first, what this sender took before a restart
        next_hold = time.monotonic() + HOLD_EVERY_S
        while not self._stopping.is_set():
            try:
                if time.monotonic() >= next_hold:
                    with self._lock:
                        held = list(self._held)
                    self.events.hold(self.consumer, held)
                    next_hold = time.monotonic() + HOLD_EVERY_S
                room = BACKLOG - self.backlog()
                if room <= 0:
                    self._stopping.wait(0.2)
                    continue
                events = self.events.notifications(
                    self.consumer, min(room, 16), 1000, RECLAIM_IDLE_MS, own
                )
            except redis.RedisError as e:
                log.warning("webhooks: redis unavailable: %s", e)
                self._stopping.wait(2)
                continue
            own = False
            for event in events:
                with self._lock:
                    if event.entry_id in self._held:
                        continue
                    self._held.add(event.entry_id)
                self._pool.submit(self._deliver, event)

    def _deliver(self, event: Notification) -> None:
        try:
            if self._send(event):
                self.events.notified(event)
            # else cut short by a stop: left pending, for this sender's next start or a takeover
        except redis.RedisError as e:  # left pending: taken over, and sent, later
            log.warning("webhooks: redis unavailable: %s", e, extra={"job_id": event.job_id})
        except Exception:
            log.exception("webhook failed", extra={"job_id": event.job_id})
        finally:
            with self._lock:
                self._held.discard(event.entry_id)

    def _send(self, event: Notification) -> bool:
        """Send with retries; True when done with the event (sent, refused or given up on),
        False when a stop cut the retries short."""
        target = self.events.webhook_target(event.job_id)
        view = self.jobs.view(event.job_id, target[1]) if target else None
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
            address, reason = resolve(url, self.allow_private)  # again: DNS may have changed
            if address is None:
                log.warning("webhook not sent: %s", reason, extra=extra)
                return True
            timestamp = str(int(time.time()))
            parts = urlsplit(url)
            headers = {
                "Host": parts.netloc.rpartition("@")[2],
                "Content-Type": "application/json",
                "Webhook-Id": event.entry_id,
                "Webhook-Timestamp": timestamp,
                "Webhook-Signature": sign(self.secret, timestamp, body),
            }
            # TLS checks the certificate against the URL's host, not the address.
            tls = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
            try:
                response = self._http.post(
                    pinned(url, address), content=body, headers=headers, extensions=tls
                )
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
