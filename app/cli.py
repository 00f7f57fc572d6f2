"""The `sdserve` command: api, worker, dev, make-tiny-model.

The worker side is imported only by the subcommands that need it, so the API image (no torch)
runs `sdserve api` without it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
from pathlib import Path

from pydantic import ValidationError

from app.auth import is_loopback, new_key
from app.jobs import logs
from app.jobs.contract import SCHEDULERS
from app.jobs.settings import load, refuse
from app.settings import ApiSettings


def lora_arg(text: str) -> dict[str, object]:
    """`--lora NAME[:WEIGHT[:UNET]]` as a request's LoRA (A1111's tag's order: with two
    numbers, the first is the text encoders')."""
    name, *numbers = text.split(":")
    try:
        weights = [float(n) for n in numbers]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: NAME, NAME:WEIGHT or NAME:TE:UNET") from None
    if not name or len(weights) > 2:
        raise argparse.ArgumentTypeError(f"{text!r}: NAME, NAME:WEIGHT or NAME:TE:UNET")
    if len(weights) == 2:
        return {"name": name, "text_weight": weights[0], "weight": weights[1]}
    return {"name": name, "weight": weights[0] if weights else 1.0}


def controlnet_arg(text: str) -> dict[str, object]:
    """`--controlnet MODEL:PICTURE[:WEIGHT]` as a request's ControlNet unit, its picture read
    (a path, as base64)."""
    model, _, rest = text.partition(":")
    path, weight = rest, 1.0
    head, _, last = rest.rpartition(":")
    if head:
        with contextlib.suppress(ValueError):  # else a colon of the path's own
            path, weight = head, float(last)
    if not model or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: MODEL:PICTURE or MODEL:PICTURE:WEIGHT")
    try:
        picture = Path(path).read_bytes()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{path}: {e.strerror}") from None
    return {"model": model, "image": base64.b64encode(picture).decode(), "weight": weight}


def refiner_arg(text: str) -> dict[str, object]:
    """`--refiner MODEL[:SWITCH_AT]` as a request's refiner."""
    model, _, switch = text.partition(":")
    try:
        return {"model": model, **({"switch_at": float(switch)} if switch else {})}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: MODEL or MODEL:SWITCH_AT") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    api = sub.add_parser("api", help="serve the HTTP API")
    dev = sub.add_parser("dev", help="run Redis, the API and one worker locally; Ctrl-C stops all")
    for p in (api, dev):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
    sub.add_parser("worker", help="run one GPU (or CPU) worker")
    tiny = sub.add_parser("make-tiny-model", help="write a random-weight model (diffusers)")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument(
        "--arch",
        choices=[
            "tiny",
            "sd15",
            "sd15-inpaint",
            "tiny-sd2",
            "x4-upscaler",
            "sd-x4-upscaler",
            "tiny-sdxl",
            "tiny-sdxl-refiner",
            "sdxl",
            "sdxl-refiner",
            "tiny-controlnet",
            "tiny-sdxl-controlnet",
        ],
        default="tiny",
        help="tiny: for tests and local runs (default); sd15: SD 1.5's sizes, for benchmarks; "
        "sd15-inpaint: SD 1.5's inpainting layout (a 9-channel UNet) at the tiny sizes; "
        "tiny-sd2: SD 2.x's 768-v layout (v-prediction) at tiny sizes; "
        "x4-upscaler: the SD x4 upscaler's layout at the tiny sizes (SDSERVE_UPSCALER); "
        "sd-x4-upscaler: at its real sizes, for benchmarks; tiny-sdxl, tiny-sdxl-refiner: "
        "SDXL's base and refiner layouts at the tiny sizes; sdxl, sdxl-refiner: at their real "
        "sizes, for benchmarks; tiny-controlnet, tiny-sdxl-controlnet: a random ControlNet "
        "for the tiny SD or SDXL model (SDSERVE_CONTROLNETS)",
    )
    tiny.add_argument("--seed", type=int, default=0, help="another seed, other weights")
    tiny.add_argument("--single-file", type=Path, metavar="OUT.safetensors",
                      help="also write the model (SD 1.x, 2.x, SDXL base and refiner, inpainting)"
                      " as one checkpoint of the"
                      " original layout, as A1111 users hold one; DIR is its configuration"
                      " (SDSERVE_MODELS: OUT.safetensors;config=DIR)")  # fmt: skip
    gen = sub.add_parser("generate", help="make images with a running sdserve, and save them")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--out", type=Path, default=Path("."), help="folder for the PNGs")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--scheduler", choices=SCHEDULERS)
    gen.add_argument("--seed", type=int)
    gen.add_argument("-n", type=int, help="number of images")
    gen.add_argument("--timeout-s", type=int, help="give up if no worker took it by then")
    gen.add_argument("--image", type=Path, help="start from this picture (img2img)")
    gen.add_argument("--mask", type=Path, help="with --image: repaint where this is white")
    gen.add_argument("--strength", type=float, help="with --image: how much is redrawn, 0-1")
    gen.add_argument("--mask-blur", type=int, help="with --mask: pixels of blur on its edge")
    gen.add_argument("--resize-mode", choices=["resize", "crop", "fill"],
                     help="with --image and --width/--height of another shape: stretch it, crop"
                     " it to cover, or fit it and fill the bands")  # fmt: skip
    gen.add_argument("--mask-crop", type=int, metavar="PADDING",
                     help="with --mask: draw the masked area only, this many pixels around it,"
                     " at the job's size (A1111's 'only masked')")  # fmt: skip
    gen.add_argument(
        "--masked-content",
        choices=["original", "fill"],
        help="with --mask: fill under the mask from around it before noising",
    )
    gen.add_argument("--model", help="which of the server's models (sdserve: GET /v1/models)")
    gen.add_argument("--lora", dest="loras", action="append", type=lora_arg, metavar="NAME:WEIGHT",
                     help="a LoRA (GET /v1/loras) at a weight (1 when absent; NAME:TE:UNET for"
                     " the text encoders' apart); again for several")  # fmt: skip
    gen.add_argument("--controlnet", dest="controlnets", action="append", type=controlnet_arg,
                     metavar="MODEL:PICTURE[:WEIGHT]",
                     help="a ControlNet (GET /v1/controlnets) steered by a picture, at a weight"
                     " (1 when absent); again for several")  # fmt: skip
    gen.add_argument(
        "--controlnet-preprocess",
        choices=["none", "canny", "invert"],
        help="with --controlnet: how its pictures become control images (none)",
    )
    gen.add_argument("--hires", dest="hires_scale", type=float, metavar="SCALE",
                     help="a hires fix: a second pass SCALE times larger (up to 4)")  # fmt: skip
    gen.add_argument("--hires-steps", type=int, help="with --hires: its steps (the job's)")
    gen.add_argument("--hires-strength", type=float,
                     help="with --hires: how much the second pass redraws, 0-1 (0.5)")  # fmt: skip
    gen.add_argument("--hires-method", choices=["latent", "pixel"],
                     help="with --hires: enlarge the latents or the picture (latent)")  # fmt: skip
    gen.add_argument("--refiner", type=refiner_arg, metavar="MODEL[:SWITCH_AT]",
                     help="another model (an SDXL refiner) finishes from SWITCH_AT of the"
                     " schedule (0.8)")  # fmt: skip
    gen.add_argument("--clip-skip", type=int, help="stop the text encoder this many layers"
                     " early, as A1111 counts (1: the last layer)")  # fmt: skip
    gen.add_argument("--vae", help="one of the server's VAEs (GET /sdapi/v1/sd-vae)")
    gen.add_argument("--upscale", dest="scale", type=int, choices=[2, 4],
                     help="with --image: enlarge it so many times (POST /v1/upscale)")  # fmt: skip
    gen.add_argument("--upscale-method", dest="method", choices=["pixel", "latent", "x4"],
                     help="with --upscale: how (x4: the server's x4 upscaler)")  # fmt: skip
    gen.add_argument("--noise-level", type=int, help="with --upscale-method x4: 0-350")
    gen.add_argument("--prompt-syntax", choices=["plain", "a1111"],
                     help="a1111: read (word:1.3), [word] and BREAK as A1111 does")  # fmt: skip
    gen.add_argument("--preview", type=Path,
                     help="save the job's live preview (JPEG) here as it forms")  # fmt: skip
    gen.add_argument("--url", default=os.environ.get("SDSERVE_URL", "http://127.0.0.1:8000"),
                     help="the API (default: $SDSERVE_URL or http://127.0.0.1:8000)")  # fmt: skip
    gen.add_argument("--key", default=os.environ.get("SDSERVE_KEY"),
                     help="API key (default: $SDSERVE_KEY)")  # fmt: skip
    key = sub.add_parser("make-key", help="make an API key; prints it once, and its config line")
    key.add_argument("id", help="the key's id: what job records and logs will show")
    args = parser.parse_args(argv)

    if args.command == "api":
        serve_api(args.host, args.port)
    elif args.command == "worker":
        from worker.settings import WorkerSettings

        settings = load(WorkerSettings)  # before torch is imported: a bad setting fails fast
        from worker.bytecode import use

        use(settings.cache_in_use())  # bytecode an earlier start kept, before torch's imports
        from worker.process import serve

        serve(settings)
    elif args.command == "dev":
        from app.dev import run_dev

        raise SystemExit(run_dev(args.host, args.port))
    elif args.command == "make-key":
        make_key(args.id)
    elif args.command == "generate":
        from app.client import main as generate

        fields = ["prompt", "negative_prompt", "width", "height", "steps", "guidance_scale",
                  "scheduler", "seed", "n", "timeout_s", "strength", "mask_blur", "mask_crop",
                  "masked_content", "resize_mode",
                  "prompt_syntax", "model", "scale", "method", "noise_level", "loras",
                  "controlnets", "refiner", "clip_skip", "vae"]  # fmt: skip
        request = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
        hires = {name: getattr(args, f"hires_{name}") for name in ("steps", "strength", "method")
                 if getattr(args, f"hires_{name}") is not None}  # fmt: skip
        if args.hires_scale is not None:
            request["hires"] = {"scale": args.hires_scale, **hires}
        elif hires:
            parser.error("--hires-steps, --hires-strength and --hires-method need --hires")
        if args.controlnet_preprocess is not None:
            if not args.controlnets:
                parser.error("--controlnet-preprocess needs --controlnet")
            for unit in request["controlnets"]:
                unit["preprocess"] = args.controlnet_preprocess
        pictures = {name: getattr(args, name) for name in ("image", "mask")
                    if getattr(args, name) is not None}  # fmt: skip
        if pictures and "image" not in pictures:
            parser.error("--mask needs --image")
        if not pictures and {"strength", "mask_blur", "scale", "resize_mode"} & request.keys():
            parser.error("--strength, --mask-blur, --resize-mode and --upscale need --image")
        if "mask" not in pictures and {"mask_crop", "masked_content"} & request.keys():
            parser.error("--mask-crop and --masked-content need --mask")
        if pictures and "hires" in request:
            parser.error("--hires takes no --image (a hires fix is text to image)")
        if "scale" in request and "mask" in pictures:
            parser.error("--upscale takes no --mask")
        if "scale" in request and "controlnets" in request:
            parser.error("--upscale takes no --controlnet")
        if "scale" not in request and {"method", "noise_level"} & request.keys():
            parser.error("--upscale-method and --noise-level need --upscale")
        generate(args.url.rstrip("/"), args.key, request, args.out, pictures, args.preview)
    else:
        for folder in (args.dir, *([] if args.single_file is None else [args.single_file.parent])):
            try:  # said as a usage error, not a traceback after the model's imports
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                parser.error(f"cannot write {folder}: {e.strerror or e}")
        from worker.tiny import build_tiny_model

        if args.arch.endswith("-controlnet"):
            import tempfile

            from worker.tiny_addons import build_tiny_controlnet

            with tempfile.TemporaryDirectory() as work:  # the model it fits: its layout only
                base = build_tiny_model(Path(work) / "model", args.arch.removesuffix("-controlnet"))
                print(build_tiny_controlnet(base, args.dir, args.seed))
            return
        print(build_tiny_model(args.dir, args.arch, args.seed))
        if args.single_file is not None:
            from worker.original_layout import write_single_file_model

            print(write_single_file_model(args.dir, args.single_file))


def make_key(key_id: str) -> None:
    try:
        key, config = new_key(key_id)
    except ValidationError:
        raise SystemExit("sdserve: a key id is 1-64 letters, digits, '_', '.' or '-'") from None
    print(f"API key for {key_id} (shown this once; only its hash is kept):\n  {key}")
    print("Add this line to SDSERVE_API_KEYS_FILE (optional fields: rate_per_s, burst,")
    print("max_in_flight):")
    print(f"  {config.model_dump_json(exclude_none=True)}")


def serve_api(host: str, port: int) -> None:
    import uvicorn

    from app.api import create_app
    from app.jobs.api_store import ApiStore
    from app.jobs.storage import open_storage

    settings = load(ApiSettings)
    if settings.auth == "off" and not is_loopback(host):
        raise SystemExit(
            f"sdserve: SDSERVE_AUTH=off is refused on {host}: without API keys, serve on a"
            " loopback address (127.0.0.1) only"
        )
    logs.configure(settings.log_json)
    if settings.auth == "off":
        logging.getLogger("sdserve.api").warning("SDSERVE_AUTH=off: anyone on this host may call")
    try:
        open_storage(settings.storage).check()
    except Exception as e:
        refuse(f"SDSERVE_STORAGE={settings.storage}: cannot use it: {e}")
    store = ApiStore.connect(settings.redis_url, settings.result_ttl_s, settings.redis_timeout_s,
                             settings.record_grace_s)  # fmt: skip
    logging.getLogger("sdserve.api").info("serving on http://%s:%d", host, port)
    uvicorn.run(create_app(store, settings), host=host, port=port, log_config=None)
