"""The wheel: only the ``fedsoft`` package at the top level, the Flower strategies under
``fedsoft.strategies``, importable and usable without the source checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> tuple[Path, Path]:
    """Build the wheel from this checkout (no network: the dev extra holds hatchling) and
    install it, without dependencies, into a fresh target directory."""
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", str(ROOT), "-w", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("fedsoft-*.whl")
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                           "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return wheel, target


def _run_installed(target: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Python with the installed wheel first on the path and the checkout nowhere on it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    env["PYTHONSAFEPATH"] = "1"  # no cwd / script dir on sys.path
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_wheel_installs_nothing_generic_at_the_top_level(wheel_install):
    wheel, _ = wheel_install
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"fedsoft"}
    assert "fedsoft/strategies/tsfa.py" in names
    assert "fedsoft/strategies/lora_fedavg.py" in names
    # the Flower app's entry points and presets are the checkout's / FAB's, not the library's
    assert not any(n.endswith(("server_app.py", "client_app.py")) for n in names)
    # the offline causal LM ships its weights and the drop-in mod / wrapper ship with the library
    assert "fedsoft/task/assets/tiny-llama/model.safetensors" in names
    assert "fedsoft/dropin/strategy.py" in names and "fedsoft/dropin/mod.py" in names


def test_installed_tiny_llama_and_dropin_load_from_the_wheel(wheel_install, tmp_path):
    _, target = wheel_install
    code = ("import sys; from fedsoft.task.models import tiny_llama_dir; "
            "from fedsoft.dropin import SoftDecode, soft_mod; "
            "d = tiny_llama_dir(); assert str(d).startswith(sys.argv[1]), d; print(d.name)")
    proc = _run_installed(target, tmp_path, "-c", code, str(target))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tiny-llama"]


def test_installed_strategies_import_from_under_fedsoft(wheel_install, tmp_path):
    _, target = wheel_install
    code = ("import sys, fedsoft.strategies as s; "
            "from fedsoft.strategies import TSFA, LoRAFedAvg; "
            "from fedsoft.strategies.records import to_record; "
            "assert 'strategies' not in sys.modules, 'top-level strategies imported'; "
            "assert s.__file__.startswith(sys.argv[1]), s.__file__; "
            "from fedsoft.strategies import SparseLoRAFedAvg, messages; "
            "from fedsoft.config import resolve; "
            "cfg = resolve({'sparsifier': 'soft', 'sparsity': 0.5}); "
            "sp = SparseLoRAFedAvg.from_config(cfg); rec = messages.train_config(cfg); "
            "assert sp.settings.sparsity == 0.5 and rec['sparsity'] == 0.5; "
            "st = LoRAFedAvg(2, seed=0); print(type(st).__mro__[1].__name__, TSFA.__name__)")
    proc = _run_installed(target, tmp_path, "-c", code, str(target))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["FedAvg", "TSFA"]


def test_installed_experiment_runner_says_it_needs_a_checkout(wheel_install, tmp_path):
    _, target = wheel_install
    proc = _run_installed(target, tmp_path, "-m", "fedsoft.experiments", "fig2", "--list")
    assert proc.returncode == 2
    assert "source checkout" in proc.stderr and "lacks" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_library_never_imports_flower_only_its_datasets_package():
    """``fedsoft/`` is the maths and the task; Flower's app API stays in strategies/, the two
    entry points and ``fedsoft/dropin/`` (the mod and wrapper other Flower apps import, under
    one name in a checkout and in the wheel); flwr-datasets partitioners are a data
    dependency, not the Flower runtime."""
    import ast

    offenders = []
    dropin = ROOT / "fedsoft" / "dropin"
    for path in sorted((ROOT / "fedsoft").rglob("*.py")):
        if dropin in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n == "flwr" or n.startswith("flwr.")]
    assert not offenders, offenders
