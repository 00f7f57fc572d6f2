"""The API's settings (prefix SDSERVE_): what it reads beside the common settings
(app/jobs/settings.py), validated before the process does anything."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from app.auth import ApiKey, Keyring, read_keys_file
from app.jobs.settings import CommonSettings, json_or_commas


class ApiSettings(CommonSettings):
    redis_timeout_s: float = Field(
        default=1.0, gt=0, le=30, description="Seconds before an unanswered Redis call is a 503."
    )
    max_decodes: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Pictures decoded at once by one API process: each may hold up to about"
        " 20 bytes a pixel of the 4096 x 4096 cap (some 320 MB for an inpainting request);"
        " more requests wait their turn.",
    )
    max_upload_bytes: int = Field(
        default=16 * 2**20,
        ge=2**16,
        le=2**28,
        description="Largest body of the routes that take images (img2img, inpaint, upscale);"
        " every other"
        " route takes at most 64 KiB.",
    )
    max_upscale_side: int = Field(
        default=2048,
        ge=64,
        le=4096,
        description="Largest side of an upscaled picture, in pixels (POST /v1/upscale).",
    )
    max_queue: int = Field(
        default=1000, ge=1, description="Jobs that may wait at once; beyond, POST answers 429."
    )
    job_timeout_s: int = Field(
        default=3600,
        ge=1,
        le=86400,
        description="A job's timeout_s when the request gives none.",
    )
    auth: Literal["on", "off"] = Field(
        default="on", description="API keys required; off is refused unless bound to loopback."
    )
    api_keys: list[ApiKey] = Field(
        default=[], description='JSON list of {"id", "sha256", ...}; see `sdserve make-key`.'
    )
    api_keys_file: Path | None = Field(
        default=None, description="A file of such keys, one JSON object a line."
    )
    rate_per_s: float = Field(
        default=5.0, gt=0, le=10_000, description="Submissions a second per key (token bucket)."
    )
    rate_burst: int = Field(default=20, ge=1, le=100_000, description="The bucket's size.")
    max_in_flight: int = Field(
        default=100, ge=1, le=1_000_000, description="Queued and running jobs per key."
    )
    docs: bool = Field(default=True, description="Serve /docs, /redoc and /openapi.json.")
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Signs webhooks (HMAC-SHA256), 16 characters or more; without it, none are"
        " sent.",
    )
    webhook_allow_private: bool = Field(
        default=False, description="Allow webhooks to private, loopback and link-local hosts."
    )
    sync_timeout_s: float = Field(
        default=300, gt=0, le=3600, description="How long POST /v1/images/generations waits."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="Origins allowed by CORS: a JSON list or comma-separated; none: no CORS"
        " headers.",
    )
    storage_redirect: bool = Field(
        default=False,
        description="Answer image downloads with a redirect to a presigned URL (s3:// only).",
    )
    sweep_interval_s: int = Field(
        default=300, ge=1, le=86400, description="How often expired images are swept."
    )

    @field_validator("webhook_secret")
    @classmethod
    def _secret_long_enough(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and len(secret.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (an empty key signs nothing)")
        return secret

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if isinstance(value, str):
            return json_or_commas(value)
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origin_shape(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
        return origins

    @field_validator("api_keys_file")
    @classmethod
    def _readable_file(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        return path

    @model_validator(mode="after")
    def _keys(self) -> ApiSettings:
        if self.storage_redirect and not self.storage.startswith("s3://"):
            raise ValueError(
                "SDSERVE_STORAGE_REDIRECT=true needs SDSERVE_STORAGE=s3://...: a directory has"
                " no URLs to redirect to"
            )
        if self.api_keys_file is not None:
            try:
                keys = read_keys_file(self.api_keys_file)
            except OSError as e:
                raise ValueError(f"SDSERVE_API_KEYS_FILE: {e.strerror}") from None
            self.api_keys = [*self.api_keys, *keys]
        if self.auth == "on" and not self.api_keys:
            raise ValueError(
                "SDSERVE_AUTH=on needs API keys: set SDSERVE_API_KEYS or SDSERVE_API_KEYS_FILE"
                " (`sdserve make-key ID` makes one), or SDSERVE_AUTH=off on a loopback address"
            )
        self.keyring()  # ids and hashes unique
        return self

    def keyring(self) -> Keyring:
        return Keyring(self.api_keys, self.rate_per_s, self.rate_burst, self.max_in_flight)
