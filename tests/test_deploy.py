"""Deployment: credentials, the docker compose file, and a real TLS + SuperNode-auth federation
(SuperLink and 2 SuperNodes as separate processes on 127.0.0.1) running 2 rounds."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedsoft.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


credentials = _load("fedsoft_docker_credentials", DOCKER / "credentials.py")
local = _load("fedsoft_deploy_local", ROOT / "scripts" / "deploy" / "local.py")


# --- credentials -------------------------------------------------------------------------------
def test_credentials_have_sans_and_flower_key_format(tmp_path):
    written = credentials.generate(tmp_path, 2, ["superlink", "127.0.0.1", "10.1.2.3"])
    assert len(written) == 4 + 2 * 2
    certs = tmp_path / "certs"
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    assert cert.issuer == ca.subject
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                           cert.signature_hash_algorithm)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1",
                                                                            "10.1.2.3"]
    assert (certs / "server.key").stat().st_mode & 0o077 == 0
    for i in range(2):
        private = load_ssh_private_key((tmp_path / "keys" / f"supernode-{i}").read_bytes(), None)
        public = load_ssh_public_key((tmp_path / "keys" / f"supernode-{i}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
    # idempotent: nothing is rewritten, a third node only adds its key pair
    assert credentials.generate(tmp_path, 2) == []
    assert [p.name for p in credentials.generate(tmp_path, 3)] == ["supernode-2",
                                                                    "supernode-2.pub"]


def test_private_keys_are_0600_from_creation(tmp_path, monkeypatch):
    """Every file is created through os.open(O_CREAT | O_EXCL, 0o600) on a fresh temporary
    name and renamed into place; a private key is never, not even for a moment, readable by
    group or others, whatever the umask; final modes 0600 (keys) and 0644 (public files)."""
    real_open = credentials.os.open
    opened: list[tuple[str, int, int, int]] = []

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        # the permissions the file has at its first moment, before any byte is written
        opened.append((str(path), flags, mode, os.fstat(fd).st_mode & 0o777))
        return fd

    monkeypatch.setattr(credentials.os, "open", spy_open)
    old_umask = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        credentials.generate(tmp_path, 2)
        credentials.generate(tmp_path, 2, force=True)  # rewriting existing keys: same path
    finally:
        os.umask(old_umask)
    private = {"ca.key", "server.key", "supernode-0", "supernode-1"}
    public = {"ca.crt", "server.pem", "supernode-0.pub", "supernode-1.pub"}
    assert len(opened) == 8 + 4  # every file once, then the 4 certificate files again
    for path, flags, mode, first_mode in opened:
        name = Path(path).name
        assert name.startswith(".") and name.endswith(".tmp"), path  # a fresh temporary name
        assert flags & os.O_CREAT and flags & os.O_EXCL, path
        assert mode == 0o600 and first_mode == 0o600, (path, oct(mode), oct(first_mode))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert path.name in private | public, path  # no temporary file left behind
            want = 0o600 if path.name in private else 0o644
            assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode))
    assert not hasattr(credentials, "chmod") and "os.chmod" not in (
        DOCKER / "credentials.py").read_text()


def test_missing_sans_are_reported(tmp_path):
    credentials.generate(tmp_path, 0, ["superlink", "127.0.0.1"])
    assert credentials.missing_sans(tmp_path / "certs", ["superlink", "127.0.0.1"]) == []
    assert credentials.missing_sans(tmp_path / "certs", ["gateway", "superlink", "::1"]) == [
        "gateway", "::1"]
    assert "gateway" in credentials.DEFAULT_SANS and "gateway-admin" in credentials.DEFAULT_SANS


# --- docker compose ----------------------------------------------------------------------------
class _ComposeLoader(yaml.SafeLoader):
    """Compose's merge tags (``!reset``, ``!override``) as plain values."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)
_ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: (loader.construct_mapping(node, deep=True)
                          if isinstance(node, yaml.MappingNode)
                          else loader.construct_sequence(node, deep=True)))


def _compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    out = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return out.returncode == 0


def _supernodes(services: dict) -> dict:
    return {k: v for k, v in services.items() if k.startswith("supernode-")}


def _interpolate(value, env=None):
    """Compose's ``${VAR:-default}`` with the defaults (or ``env``)."""
    env = env or {}
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1], m[2]), value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


def _load_compose(*names):
    return _interpolate(yaml.load((DOCKER / names[0]).read_text(), Loader=_ComposeLoader))


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path of the bind mounts (``host:container[:ro]``)."""
    out = {}
    for vol in service.get("volumes", []):
        host, container = vol.split(":")[:2]
        out[container] = host
    return out


PRIVATE_FILES = re.compile(r"(^|/)(ca\.key|server\.key|supernode-\d+)$")


def test_compose_file_services_tls_auth_gpus_volumes():
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    compose = _load_compose("compose.yaml")
    services = compose["services"]
    link = services["superlink"]
    # the command parses with flwr 1.42's own flower-superlink parser: TLS + SuperNode auth
    args = _parse_args_run_superlink().parse_args(link["command"])
    assert not args.insecure and args.enable_supernode_auth
    assert args.runtime_dependency_install is False
    assert (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile) == (
        "/certs/ca.crt", "/certs/server.pem", "/certs/server.key")
    assert (args.host, args.port) == ("0.0.0.0", 8000)  # of its container, on `backend` only
    assert args.database.startswith("/state/")
    assert link["build"]["target"] == "superlink"
    assert _mounts(link) == {"/certs/ca.crt": "./credentials/certs/ca.crt",
                             "/certs/server.pem": "./credentials/certs/server.pem",
                             "/certs/server.key": "./credentials/certs/server.key",
                             "/state": "superlink-state", "/workspace/runs": "../runs"}
    assert link["healthcheck"]["test"]

    nodes = _supernodes(services)
    num = len(nodes)
    assert num >= 2
    parser = _parse_args_run_supernode()
    for i, name in enumerate(sorted(nodes)):
        node = nodes[name]
        assert name == f"supernode-{i}"
        args = parser.parse_args(node["command"])
        assert not args.insecure
        assert args.root_certificates == "/certs/ca.crt"
        assert args.superlink == "gateway:8000"  # the public listener, not the SuperLink
        assert args.auth_supernode_private_key == f"/keys/supernode-{i}"
        assert args.node_config == f"partition-id={i} num-partitions={num}"
        assert node["build"]["target"] == "supernode"
        assert "nvidia/cuda" in node["build"]["args"]["BASE_IMAGE"]
        devices = node["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert devices[0]["device_ids"] == ["0"]  # GPU 0 of its machine unless set
        # its own private key and the CA certificate, nothing else of credentials/
        assert _mounts(node) == {"/certs/ca.crt": "./credentials/certs/ca.crt",
                                 f"/keys/supernode-{i}": f"./credentials/keys/supernode-{i}",
                                 "/data": f"{name}-data"}
        assert f"{name}-data" in compose["volumes"]
        assert node["depends_on"] == {"gateway": {"condition": "service_started"}}
        assert node["restart"] == "on-failure"
    cli = services["cli"]
    assert cli["profiles"] == ["cli"] and cli["entrypoint"] == ["flwr"]
    assert cli["environment"]["FLWR_HOME"] == "/flwr-cli"
    # the CLI: the CA certificate and the SuperNodes' public keys (register), no private key
    assert _mounts(cli) == {"/certs/ca.crt": "./credentials/certs/ca.crt",
                            "/flwr-cli": "./flwr-cli",
                            **{f"/keys/{n}.pub": f"./credentials/keys/{n}.pub" for n in nodes}}
    cli_conf = tomllib.loads((DOCKER / "flwr-cli" / "config.toml").read_text())
    assert cli_conf["superlink"]["default"] == "docker"
    assert cli_conf["superlink"]["docker"] == {"address": "gateway-admin:9093",
                                               "root-certificates": "/certs/ca.crt"}

    cpu = _load_compose("compose.cpu.yaml")
    assert set(_supernodes(cpu["services"])) == set(nodes)
    for node in _supernodes(cpu["services"]).values():
        assert node["deploy"] is None  # !reset: no GPU reservation on CPU-only hosts
        assert node["build"]["args"]["BASE_IMAGE"].startswith("python:3.11")
        assert node["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")

    dockerfile = (DOCKER / "Dockerfile").read_text()
    for stage in ("AS superlink", "AS supernode", "ARG BASE_IMAGE", "ARG TORCH_INDEX_URL"):
        assert stage in dockerfile
    for src in re.findall(r"^COPY (?!--)(.+) \S+$", dockerfile, flags=re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path


def test_compose_exposure_gateways_networks_users():
    """Only the gateways publish ports (the Fleet listener on all interfaces, the admin listener
    on the host's 127.0.0.1); the SuperLink shares no network with SuperNodes or the CLI;
    private keys are mounted only where they are used; nobody runs as root."""
    compose = _load_compose("compose.yaml")
    services = compose["services"]
    nodes = _supernodes(services)
    link, gateway, admin, cli = (services[n] for n in ("superlink", "gateway", "gateway-admin",
                                                       "cli"))
    # ports: the SuperLink publishes nothing; the public listener is the Fleet port
    assert "ports" not in link and "expose" not in link
    assert gateway["ports"] == ["8000:8000"]
    assert admin["ports"] == ["127.0.0.1:9093:9093"]
    assert {n for n, s in services.items() if s.get("ports")} == {"gateway", "gateway-admin"}
    # networks
    assert link["networks"] == ["backend"]
    assert set(gateway["networks"]) == {"fleet", "backend"}
    assert set(admin["networks"]) == {"admin", "backend"}
    assert cli["networks"] == ["admin"]
    for node in nodes.values():
        assert node["networks"] == ["fleet"]
    on = {net: {n for n, s in services.items() if net in s.get("networks", [])}
          for net in compose["networks"]}
    assert on == {"fleet": {"gateway", *nodes}, "admin": {"gateway-admin", "cli"},
                  "backend": {"superlink", "gateway", "gateway-admin"}}
    # gateways: official unprivileged nginx, the committed templates, TLS material only
    for svc, template, listen_key, listen in ((gateway, "fleet", "FEDSOFT_FLEET_LISTEN", "8000"),
                                              (admin, "admin", "FEDSOFT_ADMIN_LISTEN", "9093")):
        assert svc["image"].startswith("nginxinc/nginx-unprivileged:")
        assert _mounts(svc) == {
            "/etc/nginx/templates/default.conf.template": f"./gateway/{template}.conf.template",
            "/certs/ca.crt": "./credentials/certs/ca.crt",
            "/certs/server.pem": "./credentials/certs/server.pem",
            "/certs/server.key": "./credentials/certs/server.key"}
        env = svc["environment"]
        assert env[listen_key] == listen and env["NGINX_ENVSUBST_FILTER"] == "^FEDSOFT_"
        assert (env["FEDSOFT_SUPERLINK"], env["FEDSOFT_SUPERLINK_NAME"]) == ("superlink:8000",
                                                                            "superlink")
        assert env["FEDSOFT_TLS_CA"] == "/certs/ca.crt"
        # every placeholder of the template is set (envsubst would leave it in, nginx fail)
        text = (DOCKER / "gateway" / f"{template}.conf.template").read_text()
        used = set(re.findall(r"\$\{(FEDSOFT_\w+)\}", text))
        assert used and used <= set(env), used - set(env)
        rendered = local.render_template(text, {k: str(v) for k, v in env.items()})
        assert f"listen {listen} ssl;" in rendered
        assert "server superlink:8000;" in rendered and "proxy_ssl_verify on;" in rendered
        assert svc["depends_on"]["superlink"]["condition"] == "service_healthy"
    # private keys: server.key only in the SuperLink and the gateways, ca.key nowhere,
    # supernode-<i> only in supernode-<i>
    for name, svc in services.items():
        private = {c: h for c, h in _mounts(svc).items() if PRIVATE_FILES.search(h)}
        assert not any(h.endswith("/credentials") or h.endswith("/certs") or h.endswith("/keys")
                       for h in _mounts(svc).values()), name  # per file, never a folder
        if name in ("superlink", "gateway", "gateway-admin"):
            assert private == {"/certs/server.key": "./credentials/certs/server.key"}, name
        elif name in nodes:
            assert private == {f"/keys/{name}": f"./credentials/keys/{name}"}, name
        else:
            assert private == {}, name
    # non-root everywhere: an explicit user on every service, USER in every image target
    for name, svc in services.items():
        user = str(svc.get("user", ""))
        assert user and not user.startswith(("0:", "root")) and user != "0", (name, user)
        assert svc["security_opt"] == ["no-new-privileges:true"] and svc["cap_drop"] == ["ALL"]
    assert link["user"] == "10001:10001" and link["build"]["args"] == {"APP_UID": "10001",
                                                                       "APP_GID": "10001"}
    dockerfile = (DOCKER / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    assert len(stages) == 3
    for stage in stages:
        users = re.findall(r"^USER (\S+)", stage, flags=re.M)
        assert users == ["${APP_UID}:${APP_GID}"], stage.splitlines()[0]
    # the CPU override keeps all of that (it only swaps images and GPU reservations)
    cpu = _load_compose("compose.cpu.yaml")
    for node in _supernodes(cpu["services"]).values():
        assert set(node) <= {"build", "image", "deploy"}


def test_gateway_templates_forward_only_what_each_side_needs():
    """Static view of docker/gateway/*.conf.template (tests/test_gateway.py runs them)."""
    from flwr.supernode import fleet_http_client

    fleet = (DOCKER / "gateway" / "fleet.conf.template").read_text()
    admin = (DOCKER / "gateway" / "admin.conf.template").read_text()
    called = set(re.findall(r'path="/v1/fleet/([a-z-]+)"',
                            Path(fleet_http_client.__file__).read_text()))
    allowed = re.search(r'"~\^/v1/fleet/\(([a-z|-]+)\)\$"', fleet)[1].split("|")
    assert sorted(allowed) == sorted(called) and len(called) == 12
    for text in (fleet, admin):
        assert "proxy_ssl_verify on;" in text and "proxy_ssl_trusted_certificate" in text
        assert re.findall(r"proxy_pass (\S+);", text)  # no URI part: the raw URI is forwarded
        assert all(target.startswith("https://") and "/" not in target[len("https://"):]
                   for target in re.findall(r"proxy_pass (\S+);", text))
        assert "location / {\n        return 404;" in text
    fleet_conf = fleet[fleet.index("\nmap "):]  # the configuration below the comments
    admin_conf = admin[admin.index("\nmap "):]
    assert "/v1/control" not in fleet_conf and "/v1/runtime" not in fleet_conf
    assert '"~^/v1/control/[a-z][a-z-]*$" 1;' in admin_conf
    assert "/v1/fleet" not in admin_conf and "/v1/runtime" not in admin_conf


def test_compose_interpolation_remote_supernode():
    """A SuperNode on another machine points at the SuperLink host through SUPERLINK_ADDRESS."""
    raw = yaml.load((DOCKER / "compose.yaml").read_text(), Loader=_ComposeLoader)
    node = _interpolate(raw["services"]["supernode-1"],
                        {"SUPERLINK_ADDRESS": "10.0.0.5:8000", "NUM_PARTITIONS": "8",
                         "SUPERNODE_1_GPU": "1"})
    assert "--superlink=10.0.0.5:8000" in node["command"]
    assert "--node-config=partition-id=1 num-partitions=8" in node["command"]
    assert node["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]


@pytest.mark.skipif(not _compose_available(), reason="docker compose not installed")
def test_docker_compose_config_validates(tmp_path):
    for files in (["compose.yaml"], ["compose.yaml", "compose.cpu.yaml"]):
        args = [a for f in files for a in ("-f", str(DOCKER / f))]
        out = subprocess.run(["docker", "compose", *args, "config", "--quiet"], cwd=DOCKER,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


# --- a real deployment on 127.0.0.1 -------------------------------------------------------------
@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """TLS SuperLink (--enable-supernode-auth) + 2 registered SuperNodes, separate processes."""
    dep = local.LocalDeployment(tmp_path_factory.mktemp("deploy"), 2, echo=lambda _: None)
    try:
        dep.prepare(extra_keys=["intruder"])
        dep.up(timeout=120)
        yield dep
    finally:
        dep.stop()


@pytest.mark.slow
def test_unregistered_supernode_is_refused(federation):
    proc = federation.start_supernode(0, key="intruder", max_retries=0)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the unregistered SuperNode was not refused:\n"
                    + federation.log_tail("intruder"))
    finally:
        local.kill_tree(proc.pid)
        federation.procs.pop("intruder", None)
    assert proc.returncode != 0
    log = federation.log_tail("intruder")
    assert "Failed to activate SuperNode" in log or "2004" in log, log
    online = [n for n in federation.nodes() if n["status"] == "online"]
    assert len(online) == 2


@pytest.mark.slow
def test_two_rounds_over_tls_with_supernode_auth(federation, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.time()
    proc = federation.run(f'preset="ci" num-server-rounds=2 run-dir="{run_dir}"', timeout=600)
    logs = "\n".join(federation.log_tail(n) for n in ("superlink", "supernode-0", "supernode-1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    runs = federation.runs()
    assert runs and runs[-1]["status"] == "finished:completed", runs
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["num_clients"] == 2 and r["uplink_bytes"] > 0 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (run_dir / "adapter").is_dir()
    # both SuperNodes answered the partition query and trained in both rounds (K = N = 2)
    for i in range(2):
        assert federation.log_tail(f"supernode-{i}", 100_000).count("Start `flwr-clientapp`") == 3
    print(f"deployment run: {time.time() - t0:.1f} s")


def test_deploy_scripts_parse(tmp_path):
    for script in sorted((ROOT / "scripts").glob("deploy-*.sh")):
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, (script, out.stderr)
    assert local.main(["--stop", "--workdir", str(tmp_path)]) == 0  # nothing left running
