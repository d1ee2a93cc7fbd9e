"""Launch `flwr run` as a subprocess on an isolated local SuperLink and always stop it after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source checkout that holds the Flower app


class CheckoutRequiredError(RuntimeError):
    """The run tooling was started from an installed package, not from a source checkout."""


def checkout_root() -> Path:
    """The checkout root (``pyproject.toml``, ``server_app.py``, ``conf/``) that ``flwr run``
    runs; the experiment runner and launcher need the Flower app, which a wheel does not hold."""
    missing = [n for n in ("pyproject.toml", "server_app.py", "client_app.py", "conf")
               if not (ROOT / n).exists()]
    if missing:
        raise CheckoutRequiredError(
            f"fedsoft's experiment tooling runs the Flower app of a source checkout, but "
            f"{ROOT} lacks {missing} (an installed package has no app): clone the repository "
            "and run it from there")
    return ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_dir() -> Path:
    """The scripts folder of the running Python's environment (``flwr``, ``flower-superlink``)."""
    return Path(sys.executable).parent


def flwr_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=str(bin_dir()) + os.pathsep + env.get("PATH", ""),
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    return env


def stop_superlink(home: Path) -> None:
    """Kill the detached local SuperLink (and its children) started for ``home``, by PID."""
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True,
                         text=True)
    for pid in (int(p) for p in out.stdout.split()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(1.0)


def flwr_run(home: Path, run_config: str, num_supernodes: int = 2, *, cpus_per_client: int = 1,
             gpus_per_client: float = 0.0, timeout: float = 900.0,
             capture: bool = True, app_dir: Path | None = None) -> subprocess.CompletedProcess:
    """``flwr run <root> --run-config ... --stream`` with ``num_supernodes`` simulated nodes.

    ``gpus_per_client`` > 0 reserves that GPU fraction per simulated client (Ray).
    ``home`` becomes FLWR_HOME (config, local SuperLink state); the SuperLink that ``flwr run``
    starts detached is killed by PID afterwards, whatever happens. ``app_dir``: another
    checkout's Flower app to run (e.g. an older version, for before/after measurements).
    """
    flwr_bin = bin_dir() / "flwr"
    if not flwr_bin.is_file():
        raise FileNotFoundError(
            f"flwr CLI not found at {flwr_bin}: run this with the Python of the environment "
            "fedsoft is installed in (e.g. .venv/bin/python, or activate that venv)")
    root = checkout_root() if app_dir is None else Path(app_dir).resolve()
    cmd = [str(flwr_bin), "run", str(root),
           "--run-config", run_config,
           "--federation-config",
           f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
           + (f" client-resources-num-gpus={gpus_per_client}" if gpus_per_client else ""),
           "--stream"]
    try:
        return subprocess.run(cmd, cwd=root, env=flwr_env(home), capture_output=capture,
                              text=True, timeout=timeout)
    finally:
        stop_superlink(home)
