"""API keys: who is calling, and the limits that come with the key.

Keys are configured as SHA-256 hashes (never in clear) with an id, which is all that job records
and logs ever hold. A presented key is hashed and compared with every configured hash in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

KEY_PREFIX = "sds_"


class ApiKey(BaseModel):
    """One configured key; limits left out take the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rate_per_s: float | None = Field(default=None, gt=0, le=10_000)
    burst: int | None = Field(default=None, ge=1, le=100_000)
    max_in_flight: int | None = Field(default=None, ge=1, le=1_000_000)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the key id and its limits (0 means none: auth is off)."""

    key_id: str
    rate_per_s: float
    burst: int
    max_in_flight: int


ANONYMOUS = Caller(key_id="", rate_per_s=0, burst=0, max_in_flight=0)


def is_loopback(host: str) -> bool:
    """Whether an API bound to `host` is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(key_id: str) -> tuple[str, ApiKey]:
    """A fresh random key (shown once) and the line that configures its hash."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, ApiKey(id=key_id, sha256=hash_key(key))


def read_keys_file(path: Path) -> list[ApiKey]:
    """One JSON object a line (`sdserve make-key` prints them); blank and # lines skipped."""
    keys = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            keys.append(ApiKey.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    return keys


class Keyring:
    def __init__(self, keys: list[ApiKey], rate_per_s: float, burst: int, max_in_flight: int):
        ids = [k.id for k in keys]
        if len(set(ids)) != len(ids) or len({k.sha256 for k in keys}) != len(keys):
            raise ValueError("API key ids and hashes must be unique")
        self._callers = [
            (
                bytes.fromhex(k.sha256),
                Caller(
                    key_id=k.id,
                    rate_per_s=k.rate_per_s or rate_per_s,
                    burst=k.burst or burst,
                    max_in_flight=k.max_in_flight or max_in_flight,
                ),
            )
            for k in keys
        ]

    def __len__(self) -> int:
        return len(self._callers)

    def find(self, presented: str) -> Caller | None:
        """The caller whose key this is; every hash is compared, in constant time each."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for stored, caller in self._callers:
            if hmac.compare_digest(stored, digest):
                found = caller
        return found
