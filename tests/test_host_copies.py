"""The GPU loop's thread must not wait for the GPU by accident. A device tensor made from host
values by `torch.tensor(..., device=...)` is a pageable copy, and PyTorch synchronizes the stream
after one: the host waits for every step it has queued. `RowMix.padded` did so at every padded
step of rows with LoRAs (an H100's half-LoRA load stepped 44 rows of 62 with its GPU busy 80% of
the time, 2026-12-05). Host values go to the device through `worker.devices` (pinned memory, no
wait), or are made on the device."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from worker.adapters import RowMix

WORKER = Path(__file__).resolve().parent.parent / "worker"
# Where a wait is harmless (or no copy is made), and why.
ALLOWED = {
    ("adapters.py", "_write"): "a LoRA's load, off the loop's thread; it synchronizes anyway",
    ("controls.py", "shapes"): "once per size, a ControlNet's output shapes",
    ("controls.py", "embed"): "the control image is on the device already (control_image)",
    ("components.py", "place"): "a model's load, before serving",
    ("components.py", "load_vae"): "a model's load, before serving",
    ("embeddings.py", "install"): "embeddings installed between steps, once per file",
    ("engine.py", "_controlnets"): "a model's load, before serving",
    ("engine.py", "_previews"): "the preview colour map, fitted once on the device",
    ("previews.py", "fit_colours"): "the preview colour map, fitted once",
}


def _copies(tree: ast.AST, source: str) -> list[tuple[str, int]]:
    """(the enclosing function, line) of each torch.tensor/as_tensor call given a device, and
    each `.to(...)` naming a device without non_blocking."""
    found: list[tuple[str, int]] = []

    def copies(call: ast.Call) -> bool:
        if not isinstance(call.func, ast.Attribute):
            return False
        named = [k.arg for k in call.keywords]
        if call.func.attr in ("tensor", "as_tensor"):
            torch_call = isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
            return torch_call and "device" in named
        if call.func.attr == "to" and "non_blocking" not in named:
            texts = [ast.get_source_segment(source, a) or "" for a in call.args]
            return "device" in named or any("device" in text for text in texts)
        return False

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = child.name
            if isinstance(child, ast.Call) and copies(child):
                found.append((function, child.lineno))
            visit(child, name)

    visit(tree, "")
    return found


def test_no_worker_module_copies_host_values_to_the_device_with_a_wait() -> None:
    """Found by the code's shape: a new place that must copy with a wait joins ALLOWED with
    its reason (tiles' shares were copied at every step of a lane in tiles until 2026-12-05)."""
    offenders = []
    for path in sorted(WORKER.glob("*.py")):
        if path.name.startswith("tiny"):  # the offline model builders, never in the loop
            continue
        source = path.read_text()
        for function, line in _copies(ast.parse(source), source):
            if (path.name, function) not in ALLOWED:
                offenders.append(f"{path.name}:{line} in {function}")
    assert offenders == [], "use worker.devices (placed, on_device): " + ", ".join(offenders)


def test_a_row_mix_is_padded_with_rows_without_loras() -> None:
    units = torch.tensor([[1, 2], [3, 4]])
    scales = torch.tensor([[0.5, 0.25], [0.75, 1.0]])
    padded = RowMix(units, scales).padded(3)
    assert padded.units.tolist() == [[1, 2], [3, 4], *[[0, 0]] * 3]
    assert padded.scales.tolist() == [[0.5, 0.25], [0.75, 1.0], *[[0.0, 0.0]] * 3]
    assert padded.units.dtype == torch.long and padded.scales.dtype == torch.float32


def test_what_the_prompt_reader_makes_is_found_for_the_loop() -> None:
    """SDSERVE_READ_STREAM: every tensor of an encoding (SD's context, SDXL's context and
    pooled) is found to be handed to the loop's stream; off CUDA there is no stream and nothing
    to order or mark, and the block runs as it would."""
    from worker.devices import Handover, _tensors, beside_the_loop, read_stream
    from worker.xl_prompts import XlPrompt

    context, pooled, plain = torch.zeros(2, 3), torch.ones(4), torch.zeros(5)
    found = list(_tensors([XlPrompt(context, pooled), plain, (plain, [context])]))
    assert [id(t) for t in found] == [id(context), id(pooled), id(plain), id(plain), id(context)]
    assert read_stream(torch.device("cpu")) is None
    ran = []
    with beside_the_loop(None):
        ran.append(True)
    handover = Handover(torch.device("cpu"))
    handover.before()
    handover.after([XlPrompt(context, pooled)])  # CPU tensors: nothing to do, no error
    assert ran == [True]
