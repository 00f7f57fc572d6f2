"""LoRA per row (issue 23): rows of one UNet call, each with its own LoRAs (or none, or
several, at their own weights), in one call whose shapes and guards never depend on them.

The design, and why. Merging a LoRA into the weights (A1111) or switching PEFT adapters
(diffusers' `set_adapters`) is model-global: a batch can hold one LoRA set, which fragments
exactly the batches continuous batching builds. Instead every layer a LoRA may adapt (the
UNet's transformer blocks' linear and 1x1 layers, the text encoders' attention and MLP) is
wrapped once, at start, by a `RowLora` that adds, for each row, `scale * up @ down @ x` over
that row's units:

- a **unit** is UNIT ranks of one LoRA's down and up weights; every wrapped layer keeps a pool
  of units (`down`: (units, UNIT, in), `up`: (units, UNIT, out)), unit 0 all zeros. A LoRA
  takes ceil(rank / UNIT) units, anywhere in the pool: LoRAs of any rank pack without holes.
- each row names `row_units` units (its LoRAs' units laid end to end, then unit 0) and a
  scale per rank (its LoRA's weight; 0 on padding): two small tensors per call, written into
  buffers the layers read (`RowBuffers`). The layers gather their rows' units and run two
  batched matrix products: the cost is that of one rank-`row_rank` LoRA on every row,
  whatever the mix, and nothing about the mix is a shape, so nothing compiles again.

Rows without a LoRA name unit 0 at scale 0 (their output is the base layer's exactly); a
worker started without SDSERVE_LORA_DIR wraps nothing and pays nothing. Fused QKV projections
are not made when LoRAs are served (a LoRA adapts q, k and v apart). LoRAs load off the GPU's
thread (`fetch`, from the job's reader thread), stay resident up to `slots`, least recently
used leave first, and a LoRA a job in flight uses never leaves (`release` at the job's end).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn

from worker import lora_kernel
from worker.devices import beside_the_loop, placed, side_stream
from worker.lora_files import Deltas, LoraUnreadable, lora_names, read, shapes, short_hash

log = logging.getLogger("sdserve.adapters")

UNIT = 8  # ranks per unit


class LoraUse(NamedTuple):
    """One LoRA on a row: its name, and its weights on the text encoders and on the UNet (A1111's
    `<lora:name:te:unet>`; one weight is both)."""

    name: str
    text: float
    unet: float


class LoraObserver(Protocol):
    """Told of each LoRA a job uses and each load (the worker's metrics)."""

    def lora_used(self, hit: bool) -> None: ...

    def lora_loaded(self, seconds: float) -> None: ...


class LoraRefused(ValueError):
    """A job's LoRAs cannot be served by this worker (unknown here, of another family, more
    ranks than a row takes): the job fails `invalid_request`, the worker goes on."""


class RowBuffers(nn.Module):
    """What each row of the next call takes from the pools: its units and a scale per rank.
    Written before every call; the wrapped layers read their rows' part."""

    units: torch.Tensor
    scales: torch.Tensor
    order: torch.Tensor

    def __init__(
        self, rows: int, row_units: int, device: torch.device, kernels: bool = True
    ) -> None:
        super().__init__()
        self.kernels = kernels  # worker/lora_kernel.py where it can serve (SDSERVE_LORA_KERNELS)
        self.register_buffer("units", torch.zeros(rows, row_units, dtype=torch.long,
                                                  device=device), persistent=False)  # fmt: skip
        self.register_buffer("scales", torch.zeros(rows, row_units * UNIT, device=device),
                             persistent=False)  # fmt: skip
        # The kernel's work list (lora_kernel.add_rows): how many rows carry LoRAs, then
        # which, the others after them.
        self.register_buffer("order", torch.zeros(rows + 1, dtype=torch.int32, device=device),
                             persistent=False)  # fmt: skip

    def write(self, mix: RowMix) -> None:
        rows = len(mix.units)
        assert rows <= len(self.units), f"{rows} rows; the buffers hold {len(self.units)}"
        self.units[:rows].copy_(mix.units, non_blocking=True)
        self.scales[:rows].copy_(mix.scales, non_blocking=True)
        self.sort(rows)

    def sort(self, rows: int) -> None:
        """The work list of a call of `rows` rows: once a call for all its adapted layers."""
        self.order[: rows + 1].copy_(row_order(self.scales[:rows]))

    def clear(self) -> None:
        """Every row without LoRAs."""
        self.scales.zero_()
        self.order.zero_()


def row_order(scales: torch.Tensor) -> torch.Tensor:
    """The kernel's work list for rows with these scales (rows, ranks): how many rows carry
    LoRAs, then their indices, then the others' (int32). Made on the device, with nothing read
    back: the loop's thread never waits for the GPU's queued steps here."""
    lora = (scales != 0).any(1)
    ranked = torch.argsort(lora.logical_not().int(), stable=True)
    return torch.cat([lora.sum().view(1), ranked]).int()


class RowMix(NamedTuple):
    """Rows' LoRA units and scales, row for row with a call's other inputs."""

    units: torch.Tensor  # (rows, row_units), long
    scales: torch.Tensor  # (rows, row_units * UNIT), float32

    def repeated(self, count: int) -> RowMix:
        """Each row `count` times in a row (a picture in tiles: a row per tile)."""
        return RowMix(self.units.repeat_interleave(count, 0),
                      self.scales.repeat_interleave(count, 0))  # fmt: skip

    def rows(self, index: torch.Tensor) -> RowMix:
        return RowMix(self.units.index_select(0, index), self.scales.index_select(0, index))

    def sliced(self, start: int, stop: int) -> RowMix:
        return RowMix(self.units[start:stop], self.scales[start:stop])

    def padded(self, padding: int) -> RowMix:
        """With `padding` more rows without LoRAs (a compiled call's padding: their outputs
        are dropped, so the kernel skips them). On the device: a mix built on the host and
        copied there would make the loop's thread wait for the GPU's queued steps at every
        padded step (a pageable copy synchronizes)."""
        return RowMix(*(torch.cat([t, t.new_zeros(padding, t.shape[1])]) for t in self))

    @staticmethod
    def joined(parts: Sequence[RowMix]) -> RowMix:
        return RowMix(torch.cat([p.units for p in parts]), torch.cat([p.scales for p in parts]))


class RowLora(nn.Module):
    """A linear or 1x1 convolution layer with each row's LoRA units added to its output."""

    down: torch.Tensor
    up: torch.Tensor

    def __init__(self, base: nn.Linear | nn.Conv2d, units: int, buffers: RowBuffers) -> None:
        super().__init__()
        self.base = base
        self.conv = isinstance(base, nn.Conv2d)
        weight = base.weight
        self.inputs, self.outputs = int(weight.shape[1]), int(weight.shape[0])
        device, dtype = weight.device, weight.dtype
        self.register_buffer("down", torch.zeros(units, UNIT, self.inputs, device=device,
                                                 dtype=dtype), persistent=False)  # fmt: skip
        self.register_buffer("up", torch.zeros(units, UNIT, self.outputs, device=device,
                                               dtype=dtype), persistent=False)  # fmt: skip
        # Not a submodule: one set of buffers is shared by every layer of a model.
        object.__setattr__(self, "buffers_", buffers)

    @property
    def weight(self) -> torch.Tensor:  # what diffusers reads of a layer (its dtype, device)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        buffers: RowBuffers = self.buffers_  # type: ignore[assignment]
        if buffers.kernels and lora_kernel.usable(x):
            # On CUDA: rows without LoRA and ranks a row does not use cost nothing.
            added = lora_kernel.layer(
                self.base, x, self.down, self.up, buffers.units, buffers.scales, buffers.order
            )
            if added is not None:
                return added
        out: torch.Tensor = self.base(x)
        units = buffers.units[:rows]
        scales = buffers.scales[:rows].to(x.dtype)
        down = self.down[units].flatten(1, 2)  # (rows, ranks, in)
        up = self.up[units].flatten(1, 2)  # (rows, ranks, out)
        if self.conv:  # (rows, in, h, w): channels are the features
            h = torch.bmm(down, x.flatten(2)) * scales[:, :, None]
            return out + torch.bmm(up.transpose(1, 2), h).view_as(out)
        h = torch.bmm(x.reshape(rows, -1, self.inputs), down.transpose(1, 2))
        h = h * scales[:, None, :]
        return out + torch.bmm(h, up).view_as(out)


def adaptable(component: str, name: str, module: nn.Module) -> bool:
    """The layers a LoRA may adapt per row: the UNet's transformer blocks' linear and 1x1
    layers (kohya's and diffusers' LoRA targets), the text encoders' attention and MLP."""
    if component == "unet":
        if ".attentions." not in f".{name}":
            return False
        if isinstance(module, nn.Conv2d):
            return module.kernel_size == (1, 1) and module.groups == 1
        return isinstance(module, nn.Linear)
    return isinstance(module, nn.Linear) and (".self_attn." in name or ".mlp." in name)


@dataclass
class Resident:
    units: list[int]  # its units in the pools, ceil(rank / UNIT)
    users: set[str] = field(default_factory=set)  # jobs in flight that use it
    loaded_s: float = 0.0
    ready: threading.Event = field(default_factory=threading.Event)  # its weights are written


class Adapters:
    """The LoRAs of one model: its wrapped layers, their pools, and which LoRA is where."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        folder: Path,
        slots: int,
        row_rank: int,
        rows: int,
        text_rows: int,
        device: torch.device,
        kernels: bool = True,
    ) -> None:
        """`modules`: the model's UNet and text encoders by component name. `rows`: the most
        rows of a UNet call, `text_rows` of a text-encoder call."""
        self.folder = folder
        self.slots = slots
        self.row_units = max(1, math.ceil(row_rank / UNIT))
        self.device = device
        self.unit_count = 1 + slots * self.row_units
        self.unet_rows = RowBuffers(rows, self.row_units, device, kernels)
        self.text_rows = RowBuffers(text_rows, self.row_units, device, kernels)
        self.layers: dict[str, dict[str, RowLora]] = {}
        for component, model in modules.items():
            buffers = self.unet_rows if component == "unet" else self.text_rows
            self.layers[component] = wrap(component, model, self.unit_count, buffers)
        self.resident: OrderedDict[str, Resident] = OrderedDict()
        self.free = list(range(1, self.unit_count))
        self.files = lora_names(folder)
        self.hits = self.misses = 0
        self.observer: LoraObserver | None = None
        self._lock = threading.Condition()
        self._shapes: dict[str, Deltas | str] = {}  # each file's layers, or why it is refused
        self._verdicts: dict[str, str | None] = {}  # `problem`'s, once its file is read
        self._hashes: dict[tuple[str, int], str] = {}
        self._zeros: dict[int, RowMix] = {}  # `zero`'s, by row count
        # LoRA weights are written on a stream of their own: on the loop's, each of a LoRA's
        # few hundred copies queued behind the UNet calls in flight, and a LoRA that took
        # 0.2 s to load alone took 1.8-2.3 s under load (an H200, 2026-12-06). On its own
        # stream it took 0.9-1.7 s (an H100, the same day): it still waits once for the calls
        # queued (`_write`). The loop's stream reads no unit written: they were free, and a
        # LoRA's units are freed only once no job holds it (`release`).
        self._copies = side_stream(device)

    def pool_bytes(self) -> int:
        """What the pools take on the GPU (allocated at start, whatever is loaded)."""
        return sum(layer.down.nbytes + layer.up.nbytes for layers in self.layers.values()
                   for layer in layers.values())  # fmt: skip

    # -- which LoRAs this model takes --------------------------------------------------------

    def rescan(self) -> None:
        """The folder listed again (each heartbeat): new files appear, removed ones go."""
        self.files = lora_names(self.folder)

    def refresh(self) -> None:
        """The folder read again (A1111's refresh-loras): a file changed under its name is
        read again at its next use (those jobs in flight hold stay until they are done)."""
        with self._lock:
            self.rescan()
            self._shapes.clear()
            self._verdicts.clear()
            for name in [n for n, r in self.resident.items() if not r.users]:
                self._evict(name)

    def problem(self, name: str) -> str | None:
        """Why this model cannot take the LoRA (None: it can): not in the folder, unreadable,
        or adapting layers of another model (another family, another size)."""
        path = self.files.get(name)
        if path is None:
            return f"no LoRA named {name!r}"
        if name not in self._verdicts:  # its layers checked once (hundreds of them)
            self._verdicts[name] = self._verdict(name, path)
        return self._verdicts[name]

    def _verdict(self, name: str, path: Path) -> str | None:
        if name not in self._shapes:
            try:
                self._shapes[name] = shapes(path)
            except LoraUnreadable as e:
                self._shapes[name] = str(e)  # said again at each use, not read again
        deltas = self._shapes[name]
        if isinstance(deltas, str):
            return deltas
        for component, layers in deltas.items():
            mine = self.layers.get(component)
            if mine is None:
                return f"LoRA {name!r} adapts a {component} this model has not (another family)"
            for layer, delta in layers.items():
                target = mine.get(layer)
                if target is None:
                    return (
                        f"LoRA {name!r} adapts {component}.{layer}, which is not a layer"
                        " this model adapts per row (another family, or a LoCon layer)"
                    )
                if (delta.down.shape[1], delta.up.shape[0]) != (target.inputs, target.outputs):
                    return (
                        f"LoRA {name!r} is for another model: {component}.{layer} is"
                        f" {target.inputs} -> {target.outputs} here"
                    )
                if delta.rank > self.row_units * UNIT:
                    return (
                        f"LoRA {name!r} has rank {delta.rank}; a row takes at most"
                        f" {self.row_units * UNIT} (SDSERVE_LORA_ROW_RANK)"
                    )
        return None

    def short_hash(self, name: str) -> str:
        """The file's short hash as A1111's infotext gives it (read once per file version)."""
        path = self.files[name]
        key = (name, path.stat().st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = short_hash(path)
        return self._hashes[key]

    def names(self) -> list[str]:
        """The folder's LoRAs this model takes."""
        return [name for name in self.files if self.problem(name) is None]

    def unreadable(self, name: str) -> bool:
        """Whether the file failed to read (not merely another model's)."""
        return isinstance(self._shapes.get(name), str)

    def skipped(self) -> dict[str, str]:
        """The folder's other files, with why this model does not take each."""
        return {name: problem for name in self.files
                if (problem := self.problem(name)) is not None}  # fmt: skip

    # -- loading, off the GPU's thread ----------------------------------------------------

    def fetch(self, key: str, uses: Sequence[LoraUse]) -> None:
        """Make the job's LoRAs resident and hold them for it until `release`. All of them are
        taken at once (two jobs holding half their LoRAs each never wait on each other); while
        the slots hold LoRAs other jobs in flight use, it waits. Raises LoraRefused, or
        LoraUnreadable for a file that fails to load."""
        names = list(dict.fromkeys(use.name for use in uses))
        if not names:
            return
        refused = self._refused(names)
        if refused is not None:
            raise LoraRefused(refused)
        with self._lock:
            while True:
                missing = [name for name in names if name not in self.resident]
                if self._room(sum(self._units_of(n) for n in missing), len(missing), names):
                    break
                self._lock.wait(1.0)
            self._take([name for name in names if name in self.resident], key)
            for name in missing:
                taken = [self.free.pop() for _ in range(self._units_of(name))]
                self.resident[name] = Resident(taken, users={key})
                self.misses += 1
                if self.observer is not None:
                    self.observer.lora_used(hit=False)
        for name in missing:
            resident = self.resident[name]
            started = time.perf_counter()
            try:
                self._write(name, resident.units)
            except Exception:
                with self._lock:
                    for gone in missing:
                        self._evict(gone)
                raise
            finally:
                resident.ready.set()  # those waiting for it look again (it may be gone)
            resident.loaded_s = time.perf_counter() - started
            if self.observer is not None:
                self.observer.lora_loaded(resident.loaded_s)
            log.info("LoRA %s loaded in %.2fs into %d units (%d of %d slots in use)",
                     name, resident.loaded_s, len(resident.units), len(self.resident),
                     self.slots)  # fmt: skip
        for name in names:  # one another job's thread loads: wait until it is there
            with self._lock:
                held = self.resident.get(name)
            if held is not None:
                held.ready.wait()
            if held is None or self.resident.get(name) is not held:
                raise LoraUnreadable(f"LoRA {name!r} failed to load (for another job too)")

    def hold(self, key: str, uses: Sequence[LoraUse]) -> bool:
        """Hold the job's LoRAs for it (until `release`) where every one is resident, its
        weights written, and all of them taken once already: then nothing is read or written,
        and the loop's thread holds them at the job's take, no reader thread's hop. False:
        `fetch` them (on a reader thread). With the hop, half of a load with LoRAs took 1.2 s
        more than the other half from taken to ready, its LoRAs resident (an H200,
        2026-12-06), and its rows stayed empty meanwhile."""
        names = list(dict.fromkeys(use.name for use in uses))
        with self._lock:
            held = [self.resident.get(name) for name in names]
            if not names or any(r is None or not r.ready.is_set() for r in held):
                return False
            if any(name not in self._verdicts for name in names):  # a file to read: a reader's
                return False
            if self._refused(names) is not None:  # the reader's fetch says why
                return False
            self._take(names, key)
        return True

    def _take(self, names: Sequence[str], key: str) -> None:
        """Resident LoRAs held for the job: hits, and the most recently used. Under the lock."""
        for name in names:
            self.hits += 1
            if self.observer is not None:
                self.observer.lora_used(hit=True)
            self.resident[name].users.add(key)
            self.resident.move_to_end(name)

    def _refused(self, names: Sequence[str]) -> str | None:
        """Why a job cannot take these LoRAs together (None: it can)."""
        for name in names:
            problem = self.problem(name)
            if problem is not None:
                return problem
        units = sum(self._units_of(name) for name in names)
        if units > self.row_units:
            return (f"LoRAs of {units * UNIT} ranks in all; a row takes at most"
                    f" {self.row_units * UNIT} (SDSERVE_LORA_ROW_RANK)")  # fmt: skip
        if len(names) > self.slots:
            return (f"{len(names)} LoRAs; this worker holds {self.slots} at once"
                    " (SDSERVE_LORA_SLOTS)")  # fmt: skip
        return None

    def _units_of(self, name: str) -> int:
        deltas = self._shapes[name]
        assert not isinstance(deltas, str), "a LoRA without a problem has its layers"
        rank = max(d.rank for layers in deltas.values() for d in layers.values())
        return math.ceil(rank / UNIT)

    def _room(self, need: int, count: int, keep: Sequence[str]) -> bool:
        """Whether `need` units and `count` slots are free, evicting the least recently used
        LoRAs no job holds (but those in `keep`). Under the lock."""
        while len(self.free) < need or len(self.resident) + count > self.slots:
            idle = next((n for n, r in self.resident.items() if not r.users and n not in keep),
                        None)  # fmt: skip
            if idle is None:
                return False
            self._evict(idle)
        return True

    def _evict(self, name: str) -> None:
        resident = self.resident.pop(name, None)
        if resident is not None:
            self.free += resident.units
            log.info("LoRA %s left the GPU", name)
            self._lock.notify_all()

    @torch.inference_mode()
    def _write(self, name: str, units: list[int]) -> None:
        """The LoRA's weights into its units of every wrapped layer (zeros where it adapts
        nothing), on a CUDA stream of their own (`_copies`)."""
        if self._copies is not None:
            # After what the loop has queued: a job that left early (canceled, failed) may
            # have freed these units with its calls still queued, and a prompt encoding that
            # reads them may yet be cached for another job.
            self._copies.wait_stream(torch.cuda.default_stream(self.device))
        with beside_the_loop(self._copies):
            self._write_units(name, units)

    def _write_units(self, name: str, units: list[int]) -> None:
        deltas = read(self.files[name])
        index = placed(torch.tensor(units), self.device)
        ranks = len(units) * UNIT
        for component, layers in self.layers.items():
            mine = deltas.get(component, {})
            for layer_name, layer in layers.items():
                delta = mine.get(layer_name)
                down = torch.zeros(ranks, layer.inputs)
                up = torch.zeros(ranks, layer.outputs)
                if delta is not None:
                    down[: delta.rank] = delta.down.reshape(delta.rank, -1)
                    up[: delta.rank] = delta.up.reshape(layer.outputs, delta.rank).T
                dtype = layer.down.dtype
                down = placed(down.view(len(units), UNIT, -1), self.device, dtype)
                layer.down.index_copy_(0, index, down)
                layer.up.index_copy_(0, index, placed(up.view(len(units), UNIT, -1),
                                                      self.device, dtype))  # fmt: skip
        if self.device.type == "cuda":  # written before a job that reads them is ready
            torch.cuda.current_stream().synchronize()

    def release(self, key: str) -> None:
        """The job is done with its LoRAs: they may leave when room is needed."""
        with self._lock:
            for resident in self.resident.values():
                resident.users.discard(key)
            self._lock.notify_all()

    # -- what rows take -----------------------------------------------------------------------

    def mix(self, rows: Sequence[Sequence[LoraUse]], text: bool = False) -> RowMix:
        """Each row's units and scales (its LoRAs' weights on the text encoders with `text`,
        on the UNet otherwise). The LoRAs are resident (`fetch`). Built as lists and made
        tensors once: element by element, a call of 62 rows took a few hundred small tensor
        operations, all under the lock that jobs' LoRA fetches wait on."""
        with self._lock:  # a LoRA's units change only when it leaves, and none held leaves
            held = [[(self.resident[use.name].units, use.text if text else use.unet)
                     for use in uses] for uses in rows]  # fmt: skip
        width = self.row_units * UNIT
        units: list[list[int]] = []
        scales: list[list[float]] = []
        for uses in held:
            row_units = [unit for taken, _weight in uses for unit in taken]
            row_scales = [weight for taken, weight in uses for _ in range(len(taken) * UNIT)]
            units.append(row_units + [0] * (self.row_units - len(row_units)))
            scales.append(row_scales + [0.0] * (width - len(row_scales)))
        return RowMix(
            placed(torch.tensor(units, dtype=torch.long).reshape(len(rows), self.row_units),
                   self.device),
            placed(torch.tensor(scales, dtype=torch.float32).reshape(len(rows), width),
                   self.device),
        )  # fmt: skip

    @contextmanager
    def text(self, rows: Sequence[Sequence[LoraUse]]) -> Iterator[None]:
        """The text encoders' calls inside read these rows' LoRAs."""
        self.text_rows.write(self.mix(rows, text=True))
        yield

    def zero(self, rows: int) -> RowMix:
        """`rows` rows without LoRAs: made once for each count, on the device (every step
        takes one for each lane without LoRAs; no call writes into a mix)."""
        made = self._zeros.get(rows)
        if made is None:
            made = self._zeros[rows] = self.mix([()] * rows)
        return made


def wrap(component: str, model: nn.Module, units: int, buffers: RowBuffers) -> dict[str, RowLora]:
    """Every adaptable layer of the model replaced by its RowLora; by name."""
    targets = [(name, module) for name, module in model.named_modules()
               if adaptable(component, name, module)
               and isinstance(module, nn.Linear | nn.Conv2d)]  # fmt: skip
    out: dict[str, RowLora] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = RowLora(module, units, buffers)
        setattr(parent, child, wrapped)
        # By the name LoRA files give it (worker/lora_files.py): transformers' CLIP text models
        # differ in a leading `text_model.` between classes and versions.
        out[name.removeprefix("text_model.")] = wrapped
    return out
