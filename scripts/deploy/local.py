"""Loopback deployment: a TLS SuperLink with SuperNode authentication and N SuperNodes on
127.0.0.1, each its own process, exactly as on separate machines; then ``flwr run . <connection>``.

    bash scripts/deploy-local.sh                      # 2 SuperNodes, preset "ci", then stop
    bash scripts/deploy-local.sh --supernodes 3 --run-config 'num-server-rounds=5'
    bash scripts/deploy-local.sh --keep-running       # leave the federation up; --stop ends it
    bash scripts/deploy-local.sh --gateway            # nginx in front, as on a real host

The SuperLink always binds 127.0.0.1: it serves the Fleet, Control (no user authentication)
and Runtime APIs on one port, so it must not be reachable from the SuperNodes' network. With
``--gateway`` an nginx (``docker/gateway/*.conf.template``, rendered by ``render_gateway``) sits
in front: SuperNodes connect to its Fleet listener (``--gateway-host``, ``--fleet-port``; only
the Fleet routes are forwarded), the ``flwr`` CLI to its admin listener on 127.0.0.1 (only the
Control API). Put ``--gateway-host 0.0.0.0`` (and ``--san <host name>``) to let SuperNodes on
other machines in; nothing else of the SuperLink is exposed.

Every step prints the command it runs. Everything lives in ``--workdir`` (default
``.flwr-home/deploy-local``): ``credentials/`` (CA, SuperLink certificate, SuperNode keys from
``docker/credentials.py``), ``cli/config.toml`` (the ``flwr`` CLI's FLWR_HOME with the
``local-tls`` connection), one FLWR_HOME per process under ``homes/``, logs under ``logs/``,
the rendered nginx configuration under ``gateway/``.
Ports are free ones picked at start. Processes run in their own sessions and are ended by PID
(children included) when the run is over, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedsoft.experiments.launch import flwr_env, free_port  # noqa: E402

CONNECTION = "local-tls"
DEFAULT_WORKDIR = ROOT / ".flwr-home" / "deploy-local"
DEFAULT_RUN_CONFIG = 'preset="ci"'
GATEWAY_DIR = ROOT / "docker" / "gateway"
FLEET_TEMPLATE = GATEWAY_DIR / "fleet.conf.template"
ADMIN_TEMPLATE = GATEWAY_DIR / "admin.conf.template"


def load_credentials_module():
    """``docker/credentials.py`` (the one generator for docker and plain hosts)."""
    spec = importlib.util.spec_from_file_location("fedsoft_docker_credentials",
                                                  ROOT / "docker" / "credentials.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _descendants(pid: int) -> list[int]:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with flwr[simulation] (ray)
        return []
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def kill_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid``, its process group (it was started with a new session) and every
    descendant, by PID; SIGKILL whatever is left after ``timeout`` seconds."""
    pids = [pid, *_descendants(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.time() + timeout
        while time.time() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap our direct child
            if not any(_alive(p) for p in pids):
                return
            time.sleep(0.2)


# --- the nginx gateway ---------------------------------------------------------------------------
def find_nginx() -> str | None:
    """The ``nginx`` binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(path, os.X_OK):
            return path
    return None


def render_template(text: str, values: Mapping[str, str]) -> str:
    """``${NAME}`` -> ``values[NAME]``, as envsubst does in the nginx images; nginx's own
    variables (``$request_uri``, ...) are left alone. Every ``FEDSOFT_*`` placeholder must be
    given."""
    out = string.Template(text).safe_substitute(values)
    missing = sorted(set(re.findall(r"\$\{?(FEDSOFT_\w+)", out)))
    if missing:
        raise KeyError(f"no value for {', '.join(missing)}")
    return out


def _worker_user() -> tuple[str, str] | None:
    """nginx's worker user when started as root (www-data on Debian, else nobody)."""
    if os.geteuid() != 0:
        return None
    import grp
    import pwd
    for name in ("www-data", "nobody", "nginx"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return name, grp.getgrgid(entry.pw_gid).gr_name
    return None


def render_gateway(out: Path, *, superlink: str, superlink_name: str, cert: Path, key: Path,
                   ca: Path, fleet_listen: str, admin_listen: str | None) -> Path:
    """A self-contained nginx configuration under ``out`` (pid, logs and temp files there too)
    from the committed templates: the Fleet listener on ``fleet_listen`` and, if given, the
    admin listener on ``admin_listen``; both forward to the SuperLink at ``superlink`` over TLS
    verified against ``ca`` and the name ``superlink_name``. Returns ``out/nginx.conf``."""
    out = Path(out).resolve()
    (out / "conf.d").mkdir(parents=True, exist_ok=True)
    values = {"FEDSOFT_SUPERLINK": superlink, "FEDSOFT_SUPERLINK_NAME": superlink_name,
              "FEDSOFT_TLS_CERT": str(Path(cert).resolve()),
              "FEDSOFT_TLS_KEY": str(Path(key).resolve()),
              "FEDSOFT_TLS_CA": str(Path(ca).resolve()),
              "FEDSOFT_FLEET_LISTEN": fleet_listen}
    (out / "conf.d" / "fleet.conf").write_text(render_template(FLEET_TEMPLATE.read_text(),
                                                               values))
    admin_conf = out / "conf.d" / "admin.conf"
    if admin_listen is not None:
        admin_conf.write_text(render_template(ADMIN_TEMPLATE.read_text(),
                                              {**values, "FEDSOFT_ADMIN_LISTEN": admin_listen}))
    else:
        admin_conf.unlink(missing_ok=True)
    worker = _worker_user()
    if worker is None:
        temp = out / "temp"
        temp.mkdir(exist_ok=True)
        user = ""
    else:
        # started as root: the master reads the keys, the workers run as an unprivileged user
        # and need temp folders they can reach (``out`` may sit below 0700 folders)
        import pwd
        temp = Path(tempfile.mkdtemp(prefix="fedsoft-nginx-"))
        entry = pwd.getpwnam(worker[0])
        os.chown(temp, entry.pw_uid, entry.pw_gid)
        (out / "temp-dir").write_text(str(temp))
        user = f"user {worker[0]} {worker[1]};\n"
    conf = out / "nginx.conf"
    conf.write_text(
        "# generated by scripts/deploy/local.py from docker/gateway/*.conf.template\n"
        f"{user}"
        "worker_processes 1;\n"
        f"pid {out}/nginx.pid;\n"
        f"error_log {out}/error.log notice;\n"
        "events { worker_connections 512; }\n"
        "http {\n"
        f"    access_log {out}/access.log;\n"
        + "".join(f"    {name}_temp_path {temp}/{name};\n"
                  for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"    include {out}/conf.d/*.conf;\n"
        "}\n")
    return conf


def remove_gateway_temp(out: Path) -> None:
    """The temp folder ``render_gateway`` made outside ``out`` (started as root)."""
    marker = Path(out) / "temp-dir"
    if marker.exists():
        temp = Path(marker.read_text().strip())
        if temp.name.startswith("fedsoft-nginx-"):
            shutil.rmtree(temp, ignore_errors=True)
        marker.unlink()


class LocalDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 with TLS and SuperNode authentication; with
    ``gateway=True`` an nginx in front: SuperNodes through its Fleet listener, the CLI through
    its admin listener (127.0.0.1)."""

    def __init__(self, workdir: Path | str, num_supernodes: int = 2, *,
                 echo: Callable[[str], None] = print, gateway: bool = False,
                 gateway_host: str = "127.0.0.1", fleet_port: int | None = None,
                 sans: Sequence[str] = ()) -> None:
        if num_supernodes < 1:
            raise ValueError("num_supernodes must be >= 1")
        self.workdir = Path(workdir).resolve()
        self.num_supernodes = num_supernodes
        self.echo = echo
        self.creds = self.workdir / "credentials"
        self.cli_home = self.workdir / "cli"
        self.logs = self.workdir / "logs"
        self.gateway_dir = self.workdir / "gateway"
        self.sans = ("localhost", "127.0.0.1", *sans)
        # the SuperLink: loopback only, whatever else is configured
        self.port = free_port()
        self.superlink_address = f"127.0.0.1:{self.port}"
        self.gateway = gateway
        if gateway:
            self.fleet_port = fleet_port or free_port()
            self.admin_port = free_port()
            self.fleet_listen = f"{gateway_host}:{self.fleet_port}"
            # SuperNodes on this host go through the Fleet listener like remote ones
            local_host = "127.0.0.1" if gateway_host in ("0.0.0.0", "*") else gateway_host
            self.fleet_address = f"{local_host}:{self.fleet_port}"
            self.control_address = f"127.0.0.1:{self.admin_port}"
        else:
            self.fleet_address = self.control_address = self.superlink_address
        self.procs: dict[str, subprocess.Popen] = {}

    # --- paths -------------------------------------------------------------------------------
    @property
    def ca(self) -> Path:
        return self.creds / "certs" / "ca.crt"

    def key(self, name: str) -> Path:
        return self.creds / "keys" / name

    def env(self, home: Path) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        return flwr_env(home)

    # --- setup -------------------------------------------------------------------------------
    def prepare(self, extra_keys: Sequence[str] = ()) -> None:
        """Credentials (CA, server certificate for localhost/127.0.0.1, one key per SuperNode
        plus ``extra_keys``) and the CLI's ``config.toml`` with the ``local-tls`` connection."""
        cred = load_credentials_module()
        for path in cred.generate(self.creds, self.num_supernodes, self.sans):
            self.echo(f"[deploy] wrote {path}")
        missing = cred.missing_sans(self.creds / "certs", self.sans)
        if missing:
            raise RuntimeError(f"{self.creds / 'certs' / 'server.pem'} does not name "
                               f"{', '.join(missing)}: remove {self.creds} (or use another "
                               "--workdir) to make new credentials")
        for name in extra_keys:
            if not self.key(name).exists():
                cred.write_supernode_key(self.creds / "keys", name)
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{self.control_address}"\n'
            f'root-certificates = "{self.ca}"\n'
        )
        self.logs.mkdir(parents=True, exist_ok=True)

    def _spawn(self, name: str, cmd: list[str], home: Path,
               extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        self.echo(f"[deploy] {name}: {shlex.join(cmd)}")
        log = (self.logs / f"{name}.log").open("wb")
        env = {**self.env(home), **(extra_env or {})}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # --- processes ---------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0) -> None:
        certs = self.creds / "certs"
        cmd = ["flower-superlink",
               "--ssl-ca-certfile", str(certs / "ca.crt"),
               "--ssl-certfile", str(certs / "server.pem"),
               "--ssl-keyfile", str(certs / "server.key"),
               "--enable-supernode-auth",
               "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(self.port)]
        proc = self._spawn("superlink", cmd, self.workdir / "homes" / "superlink")
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {proc.returncode}:\n"
                                   + self.log_tail("superlink"))
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port),
                                                                         timeout=1.0):
                return
            if time.time() > deadline:
                raise TimeoutError(f"SuperLink not listening on {self.superlink_address} after "
                                   f"{timeout} s")
            time.sleep(0.5)

    def start_gateway(self, timeout: float = 30.0) -> None:
        """nginx in front of the SuperLink (``render_gateway``): the Fleet listener for the
        SuperNodes, the admin listener on 127.0.0.1 for the CLI."""
        nginx = find_nginx()
        if nginx is None:
            raise RuntimeError("nginx not found: install it (Debian/Ubuntu: apt-get install "
                               "nginx-light) or run without --gateway")
        certs = self.creds / "certs"
        conf = render_gateway(self.gateway_dir, superlink=self.superlink_address,
                              superlink_name="localhost", cert=certs / "server.pem",
                              key=certs / "server.key", ca=certs / "ca.crt",
                              fleet_listen=self.fleet_listen,
                              admin_listen=self.control_address)
        base = [nginx, "-e", str(self.gateway_dir / "error.log"), "-p", str(self.gateway_dir),
                "-c", str(conf)]
        check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected {conf}:\n{check.stderr}")
        proc = self._spawn("gateway", [*base, "-g", "daemon off;"], self.gateway_dir)
        ports = [self.fleet_port, self.admin_port]
        deadline = time.time() + timeout
        while ports:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {proc.returncode}:\n"
                                   + self.log_tail("gateway")
                                   + (self.gateway_dir / "error.log").read_text()[-3000:])
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", ports[0]),
                                                                         timeout=1.0):
                ports.pop(0)
                continue
            if time.time() > deadline:
                raise TimeoutError(f"nginx not listening on port {ports[0]} after {timeout} s")
            time.sleep(0.2)

    def flwr(self, *args: str, timeout: float = 120.0, capture: bool = True,
             echo: bool = True) -> subprocess.CompletedProcess:
        """The ``flwr`` CLI with this deployment's FLWR_HOME (``cli/config.toml``)."""
        cmd = ["flwr", *args]
        if echo:
            self.echo(f"[deploy] {shlex.join(cmd)}")
        return subprocess.run(cmd, cwd=ROOT, env=self.env(self.cli_home), text=True,
                              capture_output=capture, timeout=timeout)

    def register(self, name: str, retries: int = 10) -> None:
        """``flwr supernode register <key>.pub local-tls`` (retried while the SuperLink boots)."""
        for attempt in range(retries):
            out = self.flwr("supernode", "register", str(self.key(f"{name}.pub")), CONNECTION,
                            echo=attempt == 0)
            if out.returncode == 0:
                self.echo("[deploy] " + (out.stdout.strip().splitlines() or [""])[-1])
                return
            time.sleep(1.0)
        raise RuntimeError(f"flwr supernode register failed:\n{out.stdout}\n{out.stderr}")

    def start_supernode(self, index: int, key: str | None = None,
                        max_retries: int | None = None) -> subprocess.Popen:
        """``flower-supernode`` for partition ``index`` of ``num_supernodes``."""
        name = key or f"supernode-{index}"
        cmd = ["flower-supernode",
               "--root-certificates", str(self.ca),
               "--superlink", self.fleet_address,
               "--auth-supernode-private-key", str(self.key(name)),
               "--node-config", f"partition-id={index} num-partitions={self.num_supernodes}",
               "--port", str(free_port())]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        # all SuperNodes share this host's cores: split them instead of oversubscribing
        threads = str(max(1, (os.cpu_count() or 1) // self.num_supernodes))
        return self._spawn(name, cmd, self.workdir / "homes" / name,
                           {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})

    def nodes(self) -> list[dict]:
        """``flwr supernode list local-tls --format json`` -> the node rows."""
        out = self.flwr("supernode", "list", CONNECTION, "--format", "json", echo=False)
        text = out.stdout
        if out.returncode != 0 or "{" not in text:
            return []
        return json.loads(text[text.index("{"):]).get("nodes", [])

    def wait_online(self, count: int, timeout: float = 120.0) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n"
                                       + self.log_tail(name))
            nodes = [n for n in self.nodes() if n.get("status") == "online"]
            if len(nodes) >= count:
                self.echo(f"[deploy] {len(nodes)} SuperNodes online")
                return nodes
            if time.time() > deadline:
                raise TimeoutError(f"only {len(nodes)}/{count} SuperNodes online after "
                                   f"{timeout} s")
            time.sleep(1.0)

    def up(self, timeout: float = 180.0) -> None:
        """Credentials, SuperLink, registration of every SuperNode key, SuperNodes, all online."""
        self.prepare()
        self.start_superlink()
        if self.gateway:
            self.start_gateway()
        for i in range(self.num_supernodes):
            self.register(f"supernode-{i}")
        for i in range(self.num_supernodes):
            self.start_supernode(i)
        self.wait_online(self.num_supernodes, timeout=timeout)

    def run(self, run_config: str = DEFAULT_RUN_CONFIG, *, timeout: float = 1800.0,
            capture: bool = True) -> subprocess.CompletedProcess:
        """``flwr run <project> local-tls --run-config ... --stream`` (waits for the end)."""
        if "min-available-nodes" not in run_config and not run_config.endswith(".toml"):
            run_config = f"{run_config} min-available-nodes={self.num_supernodes}".strip()
        return self.flwr("run", str(ROOT), CONNECTION, "--run-config", run_config, "--stream",
                         timeout=timeout, capture=capture)

    def runs(self) -> list[dict]:
        """``flwr list local-tls --format json`` -> the run rows (``status`` e.g.
        ``finished:completed``)."""
        out = self.flwr("list", CONNECTION, "--format", "json", echo=False)
        text = out.stdout
        if out.returncode != 0 or "{" not in text:
            return []
        return json.loads(text[text.index("{"):]).get("runs", [])

    def stop(self) -> None:
        """End every process started here (SuperNodes, then the gateway, then the SuperLink),
        by PID, children included."""
        for name in sorted(self.procs, key=_stop_order):
            proc = self.procs[name]
            kill_tree(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self.procs:
            self.echo(f"[deploy] stopped {', '.join(self.procs)}")
        self.procs.clear()
        remove_gateway_temp(self.gateway_dir)

    def write_pids(self) -> Path:
        path = self.workdir / "pids.json"
        path.write_text(json.dumps({n: p.pid for n, p in self.procs.items()}, indent=2))
        return path

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_order(name: str) -> tuple[bool, bool]:
    return name == "superlink", name == "gateway"


def _is_ours(pid: int, workdir: Path) -> bool:
    """A Flower or nginx process of this deployment (guards against a recycled PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return True  # no /proc: trust pids.json
    return ("flower-super" in cmdline or "nginx" in cmdline) and str(workdir) in cmdline


def stop_saved(workdir: Path) -> None:
    """End the processes of a ``--keep-running`` deployment (PIDs from ``pids.json``)."""
    path = workdir / "pids.json"
    if not path.exists():
        print(f"[deploy] nothing to stop ({path} not found)")
        return
    pids = json.loads(path.read_text())
    for name, pid in sorted(pids.items(), key=lambda item: _stop_order(item[0])):
        if _alive(pid) and _is_ours(pid, workdir):
            kill_tree(pid)
            print(f"[deploy] stopped {name} (pid {pid})")
    path.unlink()
    remove_gateway_temp(workdir / "gateway")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="TLS SuperLink + authenticated SuperNodes on 127.0.0.1, then flwr run.")
    parser.add_argument("--supernodes", type=int, default=2, help="number of SuperNodes (2)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="credentials, FLWR_HOMEs and logs (.flwr-home/deploy-local)")
    parser.add_argument("--run-config", default=DEFAULT_RUN_CONFIG,
                        help=f"passed to flwr run --run-config (default: '{DEFAULT_RUN_CONFIG}'; "
                             "min-available-nodes=<supernodes> is added)")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave SuperLink and SuperNodes running after the run")
    parser.add_argument("--no-run", action="store_true", help="only bring the federation up")
    parser.add_argument("--stop", action="store_true",
                        help="stop a federation left up by --keep-running and exit")
    parser.add_argument("--gateway", action="store_true",
                        help="nginx in front of the SuperLink (docker/gateway/): SuperNodes "
                             "through its Fleet listener, the CLI through its admin listener")
    parser.add_argument("--gateway-host", default="127.0.0.1",
                        help="address of the Fleet listener (127.0.0.1; 0.0.0.0 lets SuperNodes "
                             "on other machines in); the admin listener is always 127.0.0.1")
    parser.add_argument("--fleet-port", type=int, default=None,
                        help="port of the Fleet listener (default: a free one)")
    parser.add_argument("--san", action="append", default=[],
                        help="extra host name / IP for the server certificate (repeatable), "
                             "e.g. the name remote SuperNodes use")
    args = parser.parse_args(argv)
    if not args.gateway and (args.gateway_host != "127.0.0.1" or args.fleet_port):
        parser.error("--gateway-host/--fleet-port need --gateway (the SuperLink itself only "
                     "binds 127.0.0.1)")
    if args.stop:
        stop_saved(args.workdir.resolve())
        return 0
    if (args.workdir / "pids.json").exists():  # a previous --keep-running federation
        stop_saved(args.workdir.resolve())

    sans = [name for arg in args.san for name in arg.split(",") if name.strip()]
    dep = LocalDeployment(args.workdir, args.supernodes, gateway=args.gateway,
                          gateway_host=args.gateway_host, fleet_port=args.fleet_port, sans=sans)
    keep = args.keep_running or args.no_run
    rc = 1
    try:
        dep.up()
        if dep.gateway:
            print(f"[deploy] gateway: Fleet listener {dep.fleet_listen} (SuperNodes), "
                  f"admin listener {dep.control_address} (flwr CLI); SuperLink on "
                  f"{dep.superlink_address} only")
        if args.no_run:
            rc = 0
        else:
            proc = dep.run(args.run_config, capture=False)
            rows = [r for r in dep.runs() if r.get("status")]
            status = str(rows[-1]["status"]) if rows else "unknown"
            print(f"[deploy] flwr run exit code {proc.returncode}, run status {status}")
            rc = 0 if proc.returncode == 0 and status.endswith("completed") else 1
        if keep:
            pids = dep.write_pids()
            workdir = "" if dep.workdir == DEFAULT_WORKDIR else f" --workdir {dep.workdir}"
            print(f"[deploy] federation left running (PIDs in {pids}); use it with\n"
                  f"  FLWR_HOME={dep.cli_home} flwr run . {CONNECTION} --run-config "
                  f"'min-available-nodes={dep.num_supernodes}' --stream\n"
                  f"stop it with: bash scripts/deploy-local.sh --stop{workdir}")
    except KeyboardInterrupt:
        print("[deploy] interrupted")
        keep = False
    except Exception as err:  # noqa: BLE001 - report and clean up
        print(f"[deploy] failed: {err}\n[deploy] logs in {dep.logs}", file=sys.stderr)
        keep = False
    finally:
        if not keep:
            dep.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
