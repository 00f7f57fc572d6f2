"""Nothing compiles while serving: the engine compiled as a worker compiles it on a GPU (the
fused, channels-last layout; dynamo's guards, traced with the "eager" backend so a CPU takes
seconds, not inductor's minutes), warmed up, then every request kind the job contract has run
under `fail_on_recompile`, alone and beside other kinds, in both batching modes.

The cases are keyed by the contract's request kinds: a new kind fails
`test_every_request_kind_has_a_case` until it has cases here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app.jobs.contract import (
    Hires,
    Img2ImgRequest,
    InpaintRequest,
    JobRequest,
    Lora,
    StoredImage,
    Txt2ImgRequest,
    UpscaleRequest,
)
from app.jobs.storage import Storage, input_key, open_storage
from worker.adapters import LoraUse
from worker.compiled import (
    CHUNK_TOKENS,
    COMPILER_PHASES,
    CompiledCalls,
    Tuning,
    compiler_phases,
)
from worker.engine import BatchShape, Engine, ImageSpec
from worker.rows import Lane
from worker.tasks import task
from worker.tiny_addons import build_tiny_lora

SIDE, BIG = 64, 128  # the compiled sizes: a hires pass or an upscale goes from one to the other
PICTURE = StoredImage(sha256="0" * 64, width=SIDE, height=SIDE)
LONG = "a red fox in deep snow, " * 5  # two chunks of 75 tokens in the tiny tokenizer

CASES: dict[str, list[JobRequest]] = {
    "txt2img": [
        Txt2ImgRequest(prompt="a cat", width=SIDE, height=SIDE, steps=3, seed=1),
        Txt2ImgRequest(
            prompt="unguided",
            guidance_scale=1.0,
            width=SIDE,
            height=SIDE,
            steps=3,
            scheduler="euler_a",
            seed=2,
            n=2,
        ),
        Txt2ImgRequest(
            prompt=LONG,
            negative_prompt="blurry",
            width=SIDE,
            height=SIDE,
            steps=3,
            scheduler="ddim",
            seed=3,
        ),
        Txt2ImgRequest(
            prompt="hires",
            width=SIDE,
            height=SIDE,
            steps=3,
            seed=4,
            hires=Hires(scale=2, strength=0.7, method="latent"),
        ),
        Txt2ImgRequest(
            prompt="hires",
            width=SIDE,
            height=SIDE,
            steps=3,
            seed=5,
            hires=Hires(scale=2, strength=0.7, method="pixel"),
        ),
    ],
    "img2img": [
        Img2ImgRequest(prompt="winter", image=PICTURE, width=SIDE, height=SIDE, steps=4, seed=6),
        Img2ImgRequest(
            prompt="summer",
            image=PICTURE,
            width=SIDE,
            height=SIDE,
            steps=4,
            seed=7,
            strength=1.0,
            scheduler="euler_a",
            n=2,
        ),
        Img2ImgRequest(
            prompt=LONG, image=PICTURE, width=SIDE, height=SIDE, steps=4, seed=8, guidance_scale=1.0
        ),
    ],
    "inpaint": [
        InpaintRequest(
            prompt="a door", image=PICTURE, mask=PICTURE, width=SIDE, height=SIDE, steps=3, seed=9
        ),
        InpaintRequest(
            prompt="a door",
            image=PICTURE,
            mask=PICTURE,
            width=SIDE,
            height=SIDE,
            steps=4,
            seed=10,
            strength=0.6,
            scheduler="dpmpp_2m_karras",
        ),
    ],
    "upscale": [
        UpscaleRequest(
            image=PICTURE, width=BIG, height=BIG, steps=4, seed=11, method="pixel", strength=0.5
        ),
        UpscaleRequest(
            image=PICTURE,
            width=BIG,
            height=BIG,
            steps=4,
            seed=12,
            method="latent",
            strength=0.5,
            prompt="sharp",
        ),
    ],
}


def test_every_request_kind_has_a_case() -> None:
    union = typing.get_args(typing.get_args(JobRequest)[0])
    kinds = {typing.get_args(member)[0].model_fields["kind"].default for member in union}
    assert kinds == set(CASES)


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    """The inputs of every case, as the API stores them (a picture enlarged already for
    pixel upscaling)."""
    store = open_storage(tmp_path_factory.mktemp("inputs").as_uri())
    rng = np.random.default_rng(0)
    for kind, requests in CASES.items():
        for k, request in enumerate(requests):
            if kind == "txt2img":
                continue
            # Pixel upscaling's picture is stored enlarged already, as the API stores it.
            pixel = kind == "upscale" and request.method == "pixel"  # type: ignore[union-attr]
            side = BIG if pixel else SIDE
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            store.put(input_key(f"{kind}{k}", "image"), png(Image.fromarray(pixels)))
            mask = np.zeros((side, side), np.uint8)
            mask[side // 4 :, side // 3 :] = 255
            store.put(input_key(f"{kind}{k}", "mask"), png(Image.fromarray(mask, "L")))
    yield store


def png(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def compiled_engine(
    model: Path, rows: bool, loras: Path | None = None, masked: bool = False
) -> Engine:
    sizes = ((SIDE, SIDE), (BIG, BIG))
    tuning = Tuning(max_batch=4, fuse=True, compile=True, compile_backend="eager",
                    compiled_sizes=sizes, rows=rows, prompt_chunks=2, loras=loras,
                    lora_slots=3, lora_row_rank=16, masked_contexts=masked)  # fmt: skip
    engine = Engine(str(model), torch.device("cpu"), tuning)
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def row_engine(tiny_model: Path) -> Engine:
    return compiled_engine(tiny_model, rows=True)


def run_together(engine: Engine, storage: Storage, jobs: dict[str, JobRequest]) -> int:
    """The jobs' lanes stepped together as the row loop steps them (one call per size, second
    passes joining, previews asked for every other step); returns the images made."""
    lanes: dict[str, Lane] = {}
    for key, request in jobs.items():
        work = task(request)
        source = work.source(storage, key, request)
        lanes[key] = work.prepare(engine, key, work.shape(request), source, request)
    made = 0
    turn = 0
    while lanes:
        for size in dict.fromkeys(lane.size for lane in lanes.values()):
            group = [lane for lane in lanes.values() if lane.size == size]
            engine.step(group, {lane.key for lane in group} if turn % 2 else set())
        for key, lane in [(k, lane) for k, lane in lanes.items() if lane.done]:
            then = task(jobs[key]).next_pass(engine, jobs[key], lane)
            if then is not None:
                lanes[key] = then
                continue
            made += sum(image is not None for image in engine.images(engine.finish(lane)))
            del lanes[key]
        turn += 1
    return made


def cases(kind: str) -> dict[str, JobRequest]:
    return {f"{kind}{k}": request for k, request in enumerate(CASES[kind])}


def serve_every_case(engine: Engine, storage: Storage, kind: str) -> None:
    """Each case alone (a lane of one kind only: how img2img met a stride guard), all of the
    kind together, then beside text-to-image lanes: nothing compiles."""
    text = cases("txt2img")
    with torch.compiler.set_stance("fail_on_recompile"):
        for key, request in cases(kind).items():
            assert run_together(engine, storage, {key: request}) == request.n
        run_together(engine, storage, cases(kind))
        run_together(engine, storage, cases(kind) | dict(list(text.items())[:2]))
    assert engine.calls.recompiles == 0


@pytest.mark.parametrize("kind", sorted(CASES))
def test_no_request_kind_compiles_while_serving_rows(
    kind: str, row_engine: Engine, storage: Storage
) -> None:
    serve_every_case(row_engine, storage, kind)


@pytest.fixture(scope="module")
def masked_engine(tiny_model: Path) -> Engine:
    return compiled_engine(tiny_model, rows=True, masked=True)


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_masked_contexts_compile_nothing_while_serving(
    kind: str, masked_engine: Engine, storage: Storage
) -> None:
    """`masked_contexts`: every call takes a mask, warmed with it; the kinds whose cases mix
    one- and two-chunk prompts in one call compile nothing."""
    serve_every_case(masked_engine, storage, kind)


def test_masked_contexts_that_do_not_compile_leave_the_worker_serving_per_length(
    tiny_model: Path,
    storage: Storage,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where the masked UNet fails to compile (an H100 with torch 2.11: its trace specialized
    the rows), the warm-up says so and warms the calls per prompt length instead: the worker
    starts and serves every length without compiling, where it exited before."""
    real = CompiledCalls._unet_call

    def failing(self: CompiledCalls, *args: typing.Any, **kw: typing.Any) -> torch.Tensor:
        if kw.get("mask", args[6] if len(args) > 6 else None) is not None:
            raise RuntimeError("Constraints violated (L['args'][0].size()[0])! specialized")
        out: torch.Tensor = real(self, *args, **kw)
        return out

    monkeypatch.setattr(CompiledCalls, "_unet_call", failing)
    with caplog.at_level(logging.ERROR, logger="sdserve.compiled"):
        engine = compiled_engine(tiny_model, rows=True, masked=True)
    assert not engine.calls.tuning.masked_contexts
    assert any("SDSERVE_MASKED_CONTEXTS" in r.getMessage() for r in caplog.records)
    serve_every_case(engine, storage, "txt2img")  # one- and two-chunk prompts, none compiles


def test_masked_contexts_step_every_length_in_one_call_with_the_same_images(
    masked_engine: Engine, row_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lanes of one- and two-chunk prompts, guided and not: one UNet call a step, padded and
    masked, where the unmasked engine makes one per length; each lane's latents as the
    unmasked engine makes them (the padded tokens get no attention weight)."""
    unguided = Txt2ImgRequest(prompt=LONG, guidance_scale=1.0, width=SIDE, height=SIDE,
                              steps=3, seed=8)  # fmt: skip
    jobs: dict[str, JobRequest] = {
        "short": CASES["txt2img"][0],
        "long": CASES["txt2img"][2],
        "unguided": CASES["txt2img"][1],
        "long-unguided": unguided,
    }
    calls = {id(masked_engine): 0, id(row_engine): 0}
    for engine in (masked_engine, row_engine):
        call = engine.calls._unet_call

        def counted(*args: typing.Any, _e: Engine = engine, _c: typing.Any = call,
                    **kw: typing.Any) -> torch.Tensor:  # fmt: skip
            calls[id(_e)] += 1
            out: torch.Tensor = _c(*args, **kw)
            return out

        monkeypatch.setattr(engine.calls, "_unet_call", counted)
    latents = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for engine in (masked_engine, row_engine):
            lanes = []
            for key, request in jobs.items():
                work = task(request)
                lanes.append(work.prepare(engine, key, work.shape(request), None, request))
            while not all(lane.done for lane in lanes):
                engine.step(lanes)
            latents.append([lane.latents for lane in lanes])
    assert calls == {id(masked_engine): 3, id(row_engine): 6}  # 3 steps: 1 call, or 2, each
    for masked_lane, plain in zip(*latents, strict=True):  # fp32 rounding: the sums' order
        assert float((masked_lane - plain).abs().max()) <= 1e-4 * float(plain.abs().max())
    assert masked_engine.calls.recompiles == 0


@pytest.fixture(scope="module")
def xl_row_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    from worker.tiny import build_tiny_model

    model = build_tiny_model(tmp_path_factory.mktemp("xl") / "tiny-sdxl", "tiny-sdxl")
    return compiled_engine(model, rows=True)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_no_sdxl_request_kind_compiles_while_serving_rows(
    kind: str, xl_row_engine: Engine, storage: Storage
) -> None:
    """The same for the SDXL family: its rows' added conditioning (pooled text, time ids) is
    laid out, padded and warmed with them (issue 22, 4)."""
    assert xl_row_engine.family.name == "sdxl"
    serve_every_case(xl_row_engine, storage, kind)


def test_the_warm_up_list_covers_every_bucket_and_prompt_length(row_engine: Engine) -> None:
    entries = row_engine.calls.warm_list()
    warmed = {(w.size, w.rows, w.tokens) for w in entries}
    expected = {((side, side), rows, CHUNK_TOKENS * chunks) for side in (SIDE, BIG)
                for rows in row_engine.tuning.row_buckets() for chunks in (1, 2)}  # fmt: skip
    assert warmed == expected
    # The graph is traced at the largest call (no 32-bit indexing guard below the cap).
    top = row_engine.tuning.row_cap()
    assert (entries[0].rows, entries[0].tokens) == (top, CHUNK_TOKENS * 2)


def test_entries_past_the_starts_are_left_for_idle_time_and_compile_nothing(
    row_engine: Engine, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start warms the trace's entry and, for one-chunk prompts, the fewest and the most
    rows at each compiled size; the other entries (CUDA graph recordings on a GPU, nothing to
    compile: rows and the context's length are dynamic) are left for the loop's idle time,
    one-chunk prompts and few rows first, warmed one a call, under the serving stance, without
    a recompile. The cases above ran two-chunk prompts and the middle buckets before any of
    them was warmed."""
    calls = row_engine.calls
    buckets = row_engine.tuning.row_buckets()
    assert len(buckets) > 2  # middle buckets to leave
    now, later = calls.now_and_later()
    assert now[0] == calls.warm_list()[0] and now[0].tokens == CHUNK_TOKENS * 2
    assert sorted((w.size, w.rows, w.tokens) for w in now[1:]) == sorted(
        ((side, side), rows, CHUNK_TOKENS)
        for side in (SIDE, BIG)
        for rows in (buckets[0], buckets[-1])
    )
    assert set(now).isdisjoint(later) and set(now) | set(later) == set(calls.warm_list())
    assert later == sorted(later, key=lambda w: (w.tokens, w.rows, w.size))
    assert later[0].tokens == CHUNK_TOKENS and later[0].rows == buckets[1]
    assert calls.serving and calls.entries_left() == len(later)
    warmed: list[tuple[int, int]] = []
    entry = calls._warm_entry

    def counted(warm: Any, latent_scale: int) -> None:
        warmed.append((warm.rows, warm.tokens))
        entry(warm, latent_scale)

    monkeypatch.setattr(calls, "_warm_entry", counted)
    with torch.compiler.set_stance("fail_on_recompile"):
        while row_engine.warm_next():
            pass
    assert warmed == [(w.rows, w.tokens) for w in later]
    assert calls.entries_left() == 0 and calls.recompiles == 0
    assert not row_engine.warm_next()
    static = CompiledCalls(row_engine.parts.unet, row_engine.parts.vae,
                           dataclasses.replace(row_engine.tuning, rows=False, compile=False),
                           torch.device("cpu"))  # fmt: skip
    static._fast_unet = calls._fast_unet  # a list to split, without compiling again
    assert static.now_and_later() == (static.warm_list(), [])


def test_the_compilers_phases_are_read_from_torchs_timers(
    row_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold start's minutes in the compiler's phases: the warm-up (done by the fixture)
    traced the UNet, so tracing and the whole compile have seconds, and nothing else shows."""
    phases = dict(part.split("=") for part in compiler_phases().split())
    assert {"bytecode_tracing", "_compile.compile_inner"} <= set(phases)
    assert set(phases) <= set(COMPILER_PHASES)
    assert 0 < float(phases["bytecode_tracing"]) <= float(phases["_compile.compile_inner"])
    # The same where torch's printable table is laid out in columns (`tabulate` installed, as
    # on the GPU image): the first GPU run logged nothing, its rows read as commas only.
    import torch._dynamo.utils as dynamo_utils

    def columns(rows: list[tuple[str, str]], headers: tuple[str, ...]) -> str:
        return "\n".join(f"{a:<48}{b:>12}" for a, b in [headers, *rows])

    monkeypatch.setattr(dynamo_utils, "tabulate", columns)
    assert "Runtimes" in str(dynamo_utils.compile_times(repr="str", aggregate=True))
    assert dict(part.split("=") for part in compiler_phases().split()) == phases


def test_a_call_that_would_compile_runs_eagerly_and_is_counted(row_engine: Engine) -> None:
    """A guard the warm-up did not cover (here a channels-last sample, forced past the
    canonical layout) runs eagerly, equal to the UNet's own output, and is counted."""
    calls = row_engine.calls
    seen: list[str] = []
    calls.on_recompile = seen.append
    before = calls.recompiles
    sample = torch.randn(2, 4, SIDE // 8, SIDE // 8)
    t = torch.tensor([500.0, 20.0])
    context = torch.randn(2, CHUNK_TOKENS, row_engine.unet.config.cross_attention_dim)
    fast = calls._fast_unet
    assert fast is not None
    try:
        # A function compiled for contiguous samples, given a channels-last one: a guard fails.
        calls._fast_unet = lambda s, *a, **k: fast(s.to(memory_format=torch.channels_last),
                                                   *a, **k)  # fmt: skip
        with torch.inference_mode():
            out = calls._unet_call(sample, t, context, None, compiled=True)
            eager = row_engine.unet(sample, t, encoder_hidden_states=context).sample
    finally:
        calls._fast_unet = fast
        calls.on_recompile = None
    assert calls.recompiles == before + 1
    assert seen and "stride" in seen[0]
    calls.recompiles = before
    assert torch.allclose(out, eager, atol=1e-5)


def test_the_vae_encoder_is_compiled_at_the_compiled_sizes(row_engine: Engine) -> None:
    """A picture of a compiled size goes through the compiled encoder (warmed: no compile),
    with the VAE's own numbers; another size runs eagerly."""
    calls = row_engine.calls
    assert calls._fast_encode is not None
    taken: list[tuple[int, ...]] = []
    fast = calls._fast_encode

    def seen(vae: typing.Any, pixels: torch.Tensor) -> torch.Tensor:
        taken.append(tuple(pixels.shape))
        out: torch.Tensor = fast(vae, pixels)
        return out

    calls._fast_encode = seen
    try:
        with torch.inference_mode(), torch.compiler.set_stance("fail_on_recompile"):
            for side in (SIDE, BIG, 96):
                picture = torch.rand(1, 3, side, side) * 2 - 1
                out = calls.encode(picture, compiled=row_engine.calls.compiled((side, side)))
                theirs = row_engine.vae.encode(picture).latent_dist.parameters
                assert torch.allclose(out, theirs, atol=1e-5)
    finally:
        calls._fast_encode = fast
    assert taken == [(1, 3, SIDE, SIDE), (1, 3, BIG, BIG)] and calls.recompiles == 0


def test_an_encoder_that_fails_to_compile_runs_eagerly(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A compiler failure at the encoder's warm-up is said, and the worker starts with the
    encoder eager rather than not at all."""
    tuning = Tuning(max_batch=2, compile=True, compile_backend="eager", rows=True,
                    compiled_sizes=((SIDE, SIDE),), prompt_chunks=1)  # fmt: skip
    engine = Engine(str(tiny_model), torch.device("cpu"), tuning)

    def fails(vae: typing.Any, pixels: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an inductor failure")

    engine.calls._fast_encode = fails
    with caplog.at_level("ERROR", "sdserve.compiled"):
        engine.warm_up()
    assert "the VAE encoder did not compile (it runs eagerly): an inductor failure" in caplog.text
    assert engine.calls._fast_encode is None and engine.calls.serving
    picture = torch.rand(1, 3, SIDE, SIDE) * 2 - 1
    with torch.inference_mode():
        out = engine.calls.encode(picture, compiled=True)
        assert torch.allclose(out, engine.vae.encode(picture).latent_dist.parameters)


def test_a_worker_of_many_models_compiles_each_at_warm_up() -> None:
    """Twelve VAEs of twelve architectures, each its engine's compiled encoder, in one process:
    one code object, an entry each, past dynamo's own limit of 8 (a fullgraph compile past it
    fails: a worker of many models would not start)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from worker.compiled import CompiledCalls

    unet = UNet2DConditionModel(block_out_channels=(8, 16), norm_num_groups=4,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"),
                                cross_attention_dim=8, layers_per_block=1)  # fmt: skip
    tuning = Tuning(max_batch=2, compile=True, compile_backend="eager", rows=True,
                    compiled_sizes=((SIDE, SIDE),), prompt_chunks=1)  # fmt: skip
    for k in range(1, 13):
        vae = AutoencoderKL(block_out_channels=(4 * k,), norm_num_groups=2, latent_channels=4)
        calls = CompiledCalls(unet, vae.eval(), tuning, torch.device("cpu"))
        picture = torch.rand(1, 3, SIDE, SIDE) * 2 - 1
        with torch.inference_mode():
            ours = calls.encode(picture, compiled=True)
            assert torch.allclose(ours, vae.encode(picture).latent_dist.parameters, atol=1e-5)


# Warms up the models named on its command line, in order, in one process, and prints the
# size and the dynamic sizes of the last one's UNet graph (the largest graph it traced).
TRACE_MODELS = """
import json, sys, torch
from worker.compiled import Tuning
from worker.engine import Engine

graphs = []

@torch._dynamo.register_backend
def graph_record(gm, _inputs):
    symbols = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        for size in value.shape if isinstance(value, torch.Tensor) else [value]:
            if isinstance(size, torch.SymInt):
                symbols |= {str(s) for s in size.node.expr.free_symbols}
    graphs.append((len(gm.graph.nodes), sorted(symbols)))
    return gm.forward

tuning = Tuning(max_batch=2, fuse=True, compile=True, compile_backend="graph_record",
                compiled_sizes=((64, 64),), rows=True, prompt_chunks=2)
for path in sys.argv[1:]:
    graphs.clear()
    Engine(path, torch.device("cpu"), tuning).warm_up()
print(json.dumps(max(graphs)))
"""


def test_a_second_model_compiles_the_graph_it_compiles_alone(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A refiner's UNet warmed up after its base's (one UNet class: one forward's code) traces
    the graph it traces alone, with no size made dynamic for differing from the base's: the
    graph its compile helper, a process of its own, put in the compile cache
    (worker/helpers.py). Each in a process of its own, as the worker and the helper are."""
    from worker.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("two-models")
    paths = {arch: str(build_tiny_model(root / arch, arch))
             for arch in ("tiny-sdxl", "tiny-sdxl-refiner")}  # fmt: skip

    def last_graph(*archs: str) -> Any:
        done = subprocess.run([sys.executable, "-c", TRACE_MODELS, *(paths[a] for a in archs)],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    alone = last_graph("tiny-sdxl-refiner")
    after_base = last_graph("tiny-sdxl", "tiny-sdxl-refiner")
    assert after_base == alone and alone[1]  # rows and context length dynamic, nothing else


# Rows' LoRAs: several, one, none, at other weights (issue 23, 2).
LORA_SETS = [
    (LoraUse("a", 0.7, 0.7),),
    (LoraUse("a", 0.3, 0.3), LoraUse("b", 1.0, 1.2)),
    (),
]


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl"])
def lora_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    from worker.tiny import build_tiny_model

    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    model = build_tiny_model(root / "model", request.param)
    for name, layout, rank in [("a", "peft", 4), ("b", "kohya", 8), ("c", "peft", 16)]:
        build_tiny_lora(model, root / "loras" / f"{name}.safetensors", layout, rank)  # type: ignore[arg-type]
    return compiled_engine(model, rows=True, loras=root / "loras")


def test_lora_rows_never_compile(lora_engine: Engine, storage: Storage) -> None:
    """Every request kind's cases with LoRAs on their rows (different ones, weights, ranks, or
    none), all together; then a LoRA of another rank loads (pushing one out) and they run
    again: nothing compiles. The warm-up knew no LoRA at all."""
    adapters = lora_engine.adapters
    assert adapters is not None
    jobs: dict[str, JobRequest] = {}
    for kind in sorted(CASES):
        for k, (key, request) in enumerate(cases(kind).items()):
            uses = LORA_SETS[k % len(LORA_SETS)]
            loras = [Lora(name=u.name, weight=u.unet, text_weight=u.text) for u in uses]
            jobs[key] = request.model_copy(update={"loras": loras})
            adapters.fetch(key, uses)
    with torch.compiler.set_stance("fail_on_recompile"):
        assert run_together(lora_engine, storage, jobs) == sum(r.n for r in jobs.values())
        for key in jobs:
            adapters.release(key)
        adapters.slots = 2  # room for one more: "c" pushes out the least recently used
        swapped = {k: r.model_copy(update={"loras": [Lora(name="c", weight=0.9)]})
                   for k, r in list(jobs.items())[:3]}  # fmt: skip
        try:
            for key in swapped:
                adapters.fetch(key, [LoraUse("c", 0.9, 0.9)])
            assert "c" in adapters.resident and len(adapters.resident) <= 2
            run_together(lora_engine, storage, swapped)
        finally:
            adapters.slots = lora_engine.tuning.lora_slots
            for key in swapped:
                adapters.release(key)
    assert lora_engine.calls.recompiles == 0


def test_compiled_lora_rows_equal_eager_ones(lora_engine: Engine) -> None:
    """The compiled call reads the rows' LoRAs as they are at each call (the buffers are the
    graph's inputs, not constants of its trace at warm-up, when they were zeros)."""
    adapters = lora_engine.adapters
    assert adapters is not None
    eager = Engine(lora_engine.model, torch.device("cpu"),
                   dataclasses.replace(lora_engine.tuning, compile=False))  # fmt: skip
    assert eager.adapters is not None
    images = {}
    for name, engine in (("compiled", lora_engine), ("eager", eager)):
        for k, uses in enumerate(LORA_SETS):
            key = f"{name}{k}"
            engine.adapters.fetch(key, uses)  # type: ignore[union-attr]
            spec = ImageSpec("a red fox", "blurry", 6.0, 3, loras=uses)
            lane = engine.prepare(key, [spec], BatchShape(SIDE, SIDE, 3, "euler"))
            while not lane.done:
                engine.step([lane])
            images[key] = engine.images(engine.finish(lane))[0]
            engine.adapters.release(key)  # type: ignore[union-attr]
    for k in range(len(LORA_SETS)):
        ours, theirs = images[f"compiled{k}"], images[f"eager{k}"]
        assert ours is not None and theirs is not None
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    with_lora, without = images["compiled0"], images["compiled2"]
    assert with_lora is not None and without is not None
    assert np.abs(with_lora.astype(int) - without.astype(int)).max() > 2
