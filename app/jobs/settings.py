"""Settings both processes read (prefix SDSERVE_), validated before a process does anything:
the common part of the API's and the workers' settings, and how either stops on a bad one."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from app.jobs.contract import DEFAULT_MODEL, MODEL_NAME
from app.jobs.storage import is_storage_url

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

    vaes: Annotated[dict[str, str], NoDecode] = Field(
        default={},
        description="VAEs a request may choose instead of its model's (`vae`), each NAME=SOURCE"
        " (a diffusers VAE folder, or a model folder whose `vae` it is), or a JSON object.",
    )

    controlnets: Annotated[dict[str, str], NoDecode] = Field(
        default={},
        description="ControlNets a request may name (`controlnets[k].model`), each NAME=SOURCE"
        " (a diffusers ControlNet folder, or FILE.safetensors;config=FOLDER: one file of the"
        " original layout with a folder of its kind's configuration), or a JSON object;"
        " workers load each beside every model whose UNet it fits.",
    )

    upscaler: str = Field(
        default="",
        description="The Stable Diffusion x4 upscaler (hub id or folder) for `method: x4`"
        " upscaling; none when empty. Workers load it beside their models.",
    )

    def model_names(self) -> list[str]:
        """The names a request may choose, the default first."""
        return list(self.models) or [DEFAULT_MODEL]

    @field_validator("models", "vaes", "controlnets", mode="before")
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
                raise ValueError(f"{part!r}: write each as NAME=SOURCE")
            if name.strip() in pairs:
                raise ValueError(f"{name.strip()!r} is named twice")
            pairs[name.strip()] = source.strip()
        return pairs

    @field_validator("models", "vaes", "controlnets")
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
