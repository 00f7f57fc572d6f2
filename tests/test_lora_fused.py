"""The fused LoRA product prototype (bench/lora_fused.py: each row's units added inside the base
layer's product) against the same layer in float32, in Triton's interpreter on the CPU (a
process of its own: the interpreter is chosen when the kernels are defined). Skipped where
Triton is not installed; `python3 -m bench.lora_fused` times it on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("triton") is None, reason="no Triton here"
)
def test_the_fused_product_equals_the_layer_with_its_units() -> None:
    env = os.environ | {"TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "from bench.lora_fused import check; check()"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("equal") == 6, done.stdout
