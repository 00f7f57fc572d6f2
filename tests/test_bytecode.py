"""Bytecode kept under the compile cache (worker/bytecode.py): a start whose packages had none
compiles their sources once for the next start, which reads them from there; in processes of
their own, since Python chooses where it reads bytecode when it starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Counts the sources Python compiles while it imports, then imports the package.
COUNTED = """
import importlib._bootstrap_external as external, json, sys
compiled = []
real = external.SourceLoader.source_to_code
def counted(self, data, path, *args, **kwargs):
    compiled.append(path)
    return real(self, data, path, *args, **kwargs)
external.SourceLoader.source_to_code = counted
"""


def run(script: str, site: Path, **env: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", COUNTED + script], capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
        | {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "PYTHONDONTWRITEBYTECODE": "1"} | env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_a_start_without_bytecode_keeps_it_under_the_cache_and_the_next_reads_it(
    tmp_path: Path,
) -> None:
    """The first start compiles the package's sources as it imports them (nothing written
    beside them: the install is not the worker's to write) and then keeps their bytecode in
    the cache; the next start reads it there and compiles none of them."""
    site, cache = tmp_path / "site", tmp_path / "cache"
    package = site / "sourceonly"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from sourceonly.part import VALUE\n")
    (package / "part.py").write_text("VALUE = 41 + 1\n")
    ours = [str(package / "__init__.py"), str(package / "part.py")]
    first = run(
        "import pathlib, sourceonly\n"
        "from worker import bytecode\n"
        f"cache = pathlib.Path({str(cache)!r})\n"
        "kept = bytecode.keep(cache, ('sourceonly',))\n"
        "kept.join()\n"
        "print(json.dumps({'compiled': compiled, 'place': str(bytecode.place(cache))}))\n",
        site,
    )
    assert set(ours) <= set(first["compiled"])
    assert not (package / "__pycache__").exists()
    place = Path(str(first["place"]))
    assert (place / "complete").exists()
    script = (
        "from worker import bytecode\n"
        f"at = bytecode.use(__import__('pathlib').Path({str(cache)!r}))\n"
        "import sourceonly\n"
        "print(json.dumps({'compiled': compiled, 'at': str(at), 'prefix': sys.pycache_prefix,"
        " 'cached': sourceonly.__cached__, 'value': sourceonly.VALUE,"
        " 'missing': bytecode.without_bytecode(('sourceonly',)),"
        " 'again': bytecode.keep(__import__('pathlib').Path('/nowhere'), ('sourceonly',))"
        " is None}))\n"
    )
    second = run(script, site)
    assert second["at"] == second["prefix"] == str(place)
    assert not set(ours) & set(second["compiled"])
    assert str(second["cached"]).startswith(str(place)) and second["value"] == 42
    assert second["missing"] == [] and second["again"] is True
    # A source changed since: its stale bytecode is compiled again, never run.
    (package / "part.py").write_text("VALUE = 7  # changed\n")
    changed = run(script, site)
    assert changed["value"] == 7 and str(package / "part.py") in changed["compiled"]


def test_no_kept_bytecode_is_read_before_its_place_is_complete_or_over_another_place(
    tmp_path: Path,
) -> None:
    from worker import bytecode

    cache = tmp_path / "cache"
    bytecode.place(cache).mkdir(parents=True)  # a compile cut off: no mark
    script = (
        "from worker import bytecode\n"
        f"at = bytecode.use(__import__('pathlib').Path({str(cache)!r}))\n"
        "print(json.dumps({'at': at and str(at), 'prefix': sys.pycache_prefix}))\n"
    )
    assert run(script, tmp_path) == {"at": None, "prefix": None}
    (bytecode.place(cache) / "complete").write_text("")
    assert run(script, tmp_path)["at"] == str(bytecode.place(cache))
    other = str(tmp_path / "theirs")
    assert run(script, tmp_path, PYTHONPYCACHEPREFIX=other) == {"at": None, "prefix": other}


def test_the_worker_command_reads_kept_bytecode_before_torch_is_imported(
    tmp_path: Path,
) -> None:
    """`sdserve worker` sets the place before it imports the worker (and with it torch), and
    hands it to the processes it starts (compile helpers)."""
    from worker import bytecode

    cache = tmp_path / "cache"
    bytecode.place(cache).mkdir(parents=True)
    (bytecode.place(cache) / "complete").write_text("")
    script = (
        "import os, types\n"
        "fake = types.ModuleType('worker.process')\n"
        "def serve(settings):\n"
        "    print(json.dumps({'prefix': sys.pycache_prefix, 'torch': 'torch' in sys.modules,"
        " 'env': os.environ.get('PYTHONPYCACHEPREFIX')}))\n"
        "fake.serve = serve\n"
        "sys.modules['worker.process'] = fake\n"
        "from app.cli import main\n"
        "main(['worker'])\n"
    )
    seen = run(script, tmp_path, SDSERVE_COMPILE_CACHE=str(cache), TORCHINDUCTOR_CACHE_DIR="")
    place = str(bytecode.place(cache))
    assert seen == {"prefix": place, "torch": False, "env": place}
