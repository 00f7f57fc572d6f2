"""What every router shares: the stores, the settings, who is calling, and common answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Header, HTTPException, Security
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)
from pydantic import BaseModel

from app.auth import ANONYMOUS, Caller
from app.endings import Endings
from app.jobs.api_store import ApiStore
from app.jobs.contract import JobView, is_job_id
from app.jobs.storage import Storage
from app.settings import ApiSettings

RETRY_AFTER_S = 5
# The openai SDK retries 409, 429 and 5xx; where a retry cannot help, it is told not to.
NO_RETRY = {"x-should-retry": "false"}
# The `Idempotency-Key` header of both submitting routes: printable ASCII, no spaces.
IDEMPOTENCY_KEY = Header(default=None, min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")


class Detail(BaseModel):
    detail: str


def error(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    """An error answer for the OpenAPI schema."""
    return {status: {"model": Detail, "description": description}}


NOT_FOUND = error(404, "No such job for this API key (or a malformed id).")
UNAUTHORIZED = error(401, "Missing, malformed or unknown API key (`WWW-Authenticate: Bearer`).")
UNAVAILABLE = error(503, "The queue (Redis) is unreachable; retry after `Retry-After` seconds.")


class JobEnded(HTTPException):
    """A job that ended without images, answered to a client that waited for it. Sending the
    call again cannot change the answer (a retry finds the same job), unless it timed out."""

    def __init__(self, status: int, detail: str, code: str | None) -> None:
        super().__init__(status, detail, headers=None if status == 504 else NO_RETRY)
        self.code = code


@dataclass(frozen=True)
class Context:
    store: ApiStore
    storage: Storage
    settings: ApiSettings
    # FastAPI's marker (`Depends(...)`, typed Any as FastAPI types it): the calling API key,
    # or a 401.
    authenticated: Any
    # Decodes of uploaded pictures under way in this process, at most SDSERVE_MAX_DECODES.
    decodes: asyncio.Semaphore
    # Jobs' ends as Redis publishes them: what a request that waits for its job waits on.
    endings: Endings


def make_context(
    store: ApiStore, storage: Storage, settings: ApiSettings, endings: Endings
) -> Context:
    keyring = settings.keyring()
    bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")
    # What A1111's clients send (`webuiapi`'s set_auth, `--api-auth` users): any user name, the
    # key as the password.
    basic = HTTPBasic(auto_error=False, description="An API key as the password (any user)")

    def authenticate(
        credentials: HTTPAuthorizationCredentials | None = Security(bearer),
        login: HTTPBasicCredentials | None = Security(basic),
    ) -> Caller:
        if settings.auth == "off":
            return ANONYMOUS
        key = credentials.credentials if credentials else login.password if login else None
        caller = keyring.find(key) if key else None
        if caller is None:
            challenge = 'Bearer error="invalid_token"' if key else "Bearer"
            what = "unknown API key" if key else "missing API key: Authorization: Bearer"
            raise HTTPException(401, what, headers={"WWW-Authenticate": challenge})
        return caller

    decodes = asyncio.Semaphore(settings.max_decodes)
    return Context(store, storage, settings, Depends(authenticate), decodes, endings)


def find_job(store: ApiStore, job_id: str, caller: Caller) -> JobView:
    """The job, if this caller owns it; another key's job is as unknown as a missing one."""
    view = store.view(job_id, caller.key_id) if is_job_id(job_id) else None
    if view is None:
        raise HTTPException(404, "job not found")
    return view
