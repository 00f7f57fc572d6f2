"""`sdserve generate`: a command-line client. Submits a job (text to image, or from a picture with
`--image`: inpainting with `--mask`, upscaling with `--upscale`; a hires fix with `--hires`, a
refiner with `--refiner`; on any of the server's models with `--model`), shows its place in the
queue and then its steps as a progress bar with the time left (from the job's live events;
`--preview` saves its live preview as it forms), saves the PNGs and prints their seeds and paths.
Ctrl-C cancels the job."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx

BAR_WIDTH = 30


class ClientError(Exception):
    """A failure to tell the user about in one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def generate(
    url: str, key: str | None, request: dict[str, Any], out: Path,
    pictures: dict[str, Path] | None = None, preview: Path | None = None,
) -> list[Path]:  # fmt: skip
    """Run one job to the end and save its images; returns their paths. With `pictures` (an
    `image`, and a `mask` to inpaint, or a `scale` in `request` to upscale it) the job starts
    from them, sent as multipart files; with
    `preview`, each new live preview is written there."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    _writable(out)  # before the job runs, not after: its images would be lost
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        if pictures:
            files = {name: (path.name, _read(path)) for name, path in pictures.items()}
            route = ("/v1/inpaint" if "mask" in pictures
                     else "/v1/upscale" if "scale" in request else "/v1/img2img")  # fmt: skip
            # Form fields are text: a list (the LoRAs) or an object (a refiner) goes as its JSON.
            form = {name: json.dumps(value) if isinstance(value, list | dict) else str(value)
                    for name, value in request.items()}  # fmt: skip
            job = _call(http, "POST", route, data=form, files=files)
        else:
            job = _call(http, "POST", "/v1/txt2img", json=request)
        try:
            view = _follow(http, job["url"], preview)
        except KeyboardInterrupt:
            _call(http, "DELETE", job["url"], allow=(409,))
            raise ClientError(f"canceled job {job['id']}", 130) from None
        if view["status"] != "succeeded":
            error = view.get("error") or {}
            reason = f"{error.get('code')}: {error.get('message')}" if error else view["status"]
            raise ClientError(f"job {view['id']} {view['status']}: {reason}")
        paths = []
        for image_url, seed in zip(view["images"], view["seeds"], strict=True):
            path = out / f"{view['id']}-{seed}.png"
            path.write_bytes(_call(http, "GET", image_url, raw=True))
            paths.append(path)
            print(f"seed {seed}: {path}")
        return paths


def _writable(out: Path) -> None:
    """The folder for the images, made if missing; a clear error if it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ClientError(f"cannot save into {out}: it is a file, not a folder", 2) from None
    except OSError as e:
        raise ClientError(f"cannot save into {out}: {e.strerror}", 2) from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ClientError(f"cannot read {path}: {e.strerror}", 2) from None


def _follow(http: httpx.Client, job_url: str, preview: Path | None) -> dict[str, Any]:
    """Show the job's progress from its event stream (saving each new preview to `preview`);
    returns the job once it ended."""
    view: dict[str, Any] = {}
    try:
        with http.stream("GET", f"{job_url}/events", timeout=None) as response:
            _check(response)
            for event, data in _events(response.iter_lines()):
                view = json.loads(data)
                _show(event, view)
                if preview is not None and view.get("preview_url"):
                    _save_preview(http, view["preview_url"], preview)
    except httpx.TransportError as e:
        raise ClientError(f"lost the server while waiting: {e}") from None
    finally:
        print(file=sys.stderr)
    return view


def _events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a Server-Sent Events stream."""
    event, data = "message", ""
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
        elif not line and data:
            yield event, data
            event, data = "message", ""


def _save_preview(http: httpx.Client, url: str, path: Path) -> None:
    """Write the preview beside `path`, then move it there: a viewer never sees half of it. A
    preview gone meanwhile (the job moved on) is skipped."""
    response = http.get(url)
    if response.status_code != 200:
        return
    partial = path.with_name(f".{path.name}.part")
    partial.write_bytes(response.content)
    partial.replace(path)


def _show(event: str, view: dict[str, Any]) -> None:
    eta = view.get("eta_s")
    left = f", ~{eta:.0f} s left" if eta is not None else ""
    if event == "queued":
        line = f"queued: {view['position']} jobs ahead{left}"
    elif event == "running" and view.get("progress"):
        step, steps = view["progress"]["step"], view["progress"]["steps"]
        done = BAR_WIDTH * step // max(steps, 1)
        line = f"running [{'#' * done}{'.' * (BAR_WIDTH - done)}] step {step}/{steps}{left}"
    else:
        line = event
    print(f"\r{line:<72}", end="", file=sys.stderr, flush=True)


def _call(
    http: httpx.Client, method: str, path: str, *, raw: bool = False, allow: tuple[int, ...] = (),
    **kwargs: Any,
) -> Any:  # fmt: skip
    try:
        response = http.request(method, path, **kwargs)
    except httpx.TransportError as e:
        raise ClientError(f"cannot reach {http.base_url}: {e}") from None
    if response.status_code not in allow:
        _check(response)
    return response.content if raw else response.json()


def _check(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    status = response.status_code
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text
    if status == 422 and isinstance(detail, list):
        # The field's whole path (`refiner.model`, `loras.0.name`), the body's place left out.
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                           for e in detail)  # fmt: skip
        raise ClientError(f"invalid request: {fields}", 2)
    if status == 401:
        raise ClientError(f"unauthorized ({detail}): pass --key or set SDSERVE_KEY", 2)
    hint = (
        f" (retry after {response.headers['retry-after']} s)"
        if "retry-after" in response.headers
        else ""
    )
    raise ClientError(f"{status}: {detail}{hint}", 2 if status < 500 else 1)


def main(
    url: str, key: str | None, request: dict[str, Any], out: Path, pictures: dict[str, Path],
    preview: Path | None = None,
) -> NoReturn:  # fmt: skip
    try:
        generate(url, key, request, out, pictures, preview)
    except ClientError as e:
        print(f"sdserve: {e}", file=sys.stderr)
        raise SystemExit(e.code) from None
    raise SystemExit(0)
