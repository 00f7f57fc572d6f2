"""Settings from the environment (prefix SDSERVE_), validated before a process does anything."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Literal, NoReturn, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from app.auth import ApiKey, Keyring, read_keys_file
from app.jobs.contract import DEFAULT_MODEL, MODEL_NAME
from app.storage import is_storage_url

PREFIX = "SDSERVE_"


class CommonSettings(BaseSettings):
    """What the API and the workers both read."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Redis (or Valkey) server URL."
    )
    result_ttl_s: int = Field(
        default=86400, ge=1, description="Seconds a finished job's images are kept."
    )
    record_grace_s: int = Field(
        default=86400,
        ge=0,
        le=30 * 86400,
        description="Seconds a finished job's record outlives its images (it then says"
        " `expired`); Idempotency-Keys are kept as long as records.",
    )
    log_json: bool = Field(default=False, description="Log one JSON object per line.")
    storage: str = Field(
        default_factory=lambda: (cache_dir() / "results").as_uri(),
        description="Where images live: file:///path (one host) or s3://bucket/prefix"
        " (AWS_ENDPOINT_URL and credentials from the usual AWS variables).",
    )

    models: Annotated[dict[str, str], NoDecode] = Field(
        default={},
        description="The models served, each NAME=SOURCE (a hub id or a diffusers folder):"
        " sd15=/models/sd15,anime=/models/anime, or a JSON object. The first is the default;"
        " requests choose with `model`. Unset: one model, SDSERVE_MODEL, named `default`.",
    )

    upscaler: str = Field(
        default="",
        description="The Stable Diffusion x4 upscaler (hub id or folder) for `method: x4`"
        " upscaling; none when empty. Workers load it beside their models.",
    )

    def model_names(self) -> list[str]:
        """The names a request may choose, the default first."""
        return list(self.models) or [DEFAULT_MODEL]

    @field_validator("models", mode="before")
    @classmethod
    def _models_text(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("{"):
            return json.loads(text)
        pairs = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, equals, source = part.partition("=")
            if not equals or not name.strip() or not source.strip():
                raise ValueError(f"{part!r}: write each model as NAME=SOURCE")
            if name.strip() in pairs:
                raise ValueError(f"{name.strip()!r} is named twice")
            pairs[name.strip()] = source.strip()
        return pairs

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, str]) -> dict[str, str]:
        for name, source in models.items():
            if not re.fullmatch(MODEL_NAME, name):
                raise ValueError(f"{name!r}: a name is letters, digits, '.', '_' or '-' (64 at"
                                 " most)")  # fmt: skip
            if not source:
                raise ValueError(f"{name!r} has no source")
        return models

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, url: str) -> str:
        if not is_storage_url(url):
            raise ValueError("must be file:///absolute/path or s3://bucket[/prefix]")
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url


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
    sync_timeout_s: int = Field(
        default=300, ge=1, le=3600, description="How long POST /v1/images/generations waits."
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


S = TypeVar("S", bound=BaseSettings)


def json_or_commas(value: str) -> object:
    """A list setting: JSON (`["a", "b"]`), or plain comma-separated text (`a,b`)."""
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [part.strip() for part in text.split(",") if part.strip()]


def cache_dir() -> Path:
    """Where sdserve keeps what it builds locally (the tiny model, `sdserve dev`'s Redis data)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdserve"


def refuse(message: str) -> NoReturn:
    """Stop the process on a setting that cannot work: the message, exit code 2."""
    print(f"sdserve: {message}", file=sys.stderr)
    raise SystemExit(2)


def load(cls: type[S]) -> S:
    """Read the settings or stop the process, naming each bad variable."""
    try:
        return cls()
    except SettingsError as e:
        # pydantic-settings could not even decode a value (a list or object that is not JSON).
        match = re.search(r'field "(\w+)"', str(e))
        name = PREFIX + (match.group(1).upper() if match else "?")
        refuse(f"invalid settings (1):\n  {name}={os.environ.get(name)!r}: not valid JSON")
    except ValidationError as e:
        lines = [f"sdserve: invalid settings ({e.error_count()}):"]
        for err in e.errors():
            if not err["loc"]:  # a rule across several variables names them itself
                lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
                continue
            name = PREFIX + "_".join(str(part) for part in err["loc"]).upper()
            lines.append(f"  {name}={err.get('input')!r}: {err['msg']}")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
