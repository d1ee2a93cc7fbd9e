"""The nginx gateway in front of the SuperLink (docker/gateway/*.conf.template), on loopback
without Docker: a real TLS SuperLink with --enable-supernode-auth on 127.0.0.1, nginx with the
committed templates rendered for loopback ports (scripts/deploy/local.py: render_gateway), then

(a) the Control and Runtime APIs are refused on the public (Fleet) listener, however the path is
    spelled, and `flwr supernode register` through it fails;
(b) the same calls work on the admin listener;
(c) a registered SuperNode connects through the Fleet listener and is `online`.

nginx must be installed (scripts/test.sh installs Debian's nginx-light when it is missing and it
runs as root with apt-get); otherwise these tests are skipped.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


local = _load("fedsoft_deploy_local", ROOT / "scripts" / "deploy" / "local.py")

pytestmark = pytest.mark.skipif(
    local.find_nginx() is None,
    reason="nginx is not installed (scripts/test.sh installs Debian's nginx-light when run as "
           "root with apt-get; by hand: apt-get install nginx-light)")

FLEET_ROUTES = ("register-node", "activate-node", "deactivate-node", "unregister-node",
                "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
                "push-object", "pull-object", "confirm-message-received")
# a Control API call, a Runtime API call, and spellings of them that a proxy matching on the
# normalised path but forwarding the raw one would let through
REFUSED_ON_FLEET = [
    ("POST", "/v1/control/list-nodes"),
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/runtime/get-nodes"),
    ("POST", "/v1/runtime/acquire-task"),
    ("POST", "/v1/runtime/pull-messages"),
    ("POST", "/v1/fleet/../control/list-nodes"),
    ("POST", "/v1/fleet/%2e%2e/control/list-nodes"),
    ("POST", "/v1/fleet/..%2Fcontrol/list-nodes"),
    ("POST", "/v1/fleet/pull-messages/../../control/list-nodes"),
    ("POST", "//v1/control/list-nodes"),
    ("POST", "/v1/fleet//pull-messages"),
    ("POST", "/v1/fleet/pull-messages?x=1"),
    ("POST", "/v1/fleet/PULL-MESSAGES"),
    ("POST", "/v1/fleet/unknown-route"),
    ("POST", "/v1/%63ontrol/list-nodes"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/health"),
    ("POST", "/responses"),
    ("POST", "/v1/runtime/responses"),
]


def _request(port: int, ca: Path, method: str, target: str, body: bytes = b"",
             content_type: str = "application/protobuf") -> tuple[int, bytes]:
    """One HTTPS request with ``target`` sent byte for byte (no client-side normalisation),
    the server certificate verified against ``ca``; returns (status, body)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode() + body)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def _is_nginx_refusal(status: int, body: bytes) -> bool:
    return status in (403, 404) and b"nginx" in body


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """SuperLink on 127.0.0.1 (TLS, SuperNode auth) + the nginx gateway in front of it."""
    dep = local.LocalDeployment(tmp_path_factory.mktemp("gateway"), 1, echo=lambda _: None,
                                gateway=True)
    try:
        dep.prepare(extra_keys=["via-fleet-listener"])
        dep.start_superlink()
        dep.start_gateway()
        # a second CLI home whose connection points at the public (Fleet) listener
        public_home = dep.workdir / "cli-public"
        public_home.mkdir()
        (public_home / "config.toml").write_text(
            '[superlink]\ndefault = "public"\n\n[superlink.public]\n'
            f'address = "{dep.fleet_address}"\nroot-certificates = "{dep.ca}"\n')
        dep.public_home = public_home
        yield dep
    finally:
        dep.stop()


def test_superlink_itself_binds_loopback_only(gated):
    args = gated.procs["superlink"].args
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert gated.superlink_address == f"127.0.0.1:{gated.port}"
    assert gated.control_address == f"127.0.0.1:{gated.admin_port}"
    assert len({gated.port, gated.fleet_port, gated.admin_port}) == 3
    for name in ("fleet", "admin"):
        conf = (gated.gateway_dir / "conf.d" / f"{name}.conf").read_text()
        assert "${FEDSOFT_" not in conf and "proxy_ssl_verify on;" in conf
        assert f"server {gated.superlink_address};" in conf
        assert f"proxy_ssl_trusted_certificate {gated.ca};" in conf


def test_fleet_listener_refuses_control_and_runtime_api(gated):
    ca = gated.ca
    for method, target in REFUSED_ON_FLEET:
        status, body = _request(gated.fleet_port, ca, method, target)
        assert _is_nginx_refusal(status, body), (method, target, status, body[:300])
    # the same Control/Runtime calls do exist on the SuperLink: the gateway is what stops them
    # (an encoded spelling too: the SuperLink decodes it, so the check must be on the raw URI)
    for target in ("/v1/control/list-nodes", "/v1/%63ontrol/list-nodes", "/v1/runtime/get-nodes",
                   "/v1/runtime/acquire-task", "/docs"):
        status, body = _request(gated.port, ca, "GET" if target == "/docs" else "POST", target)
        assert status != 404, (target, status, body[:300])
    # other methods on Fleet routes are refused too
    status, body = _request(gated.fleet_port, ca, "GET", "/v1/fleet/pull-messages")
    assert _is_nginx_refusal(status, body), (status, body[:300])


def test_fleet_listener_forwards_exactly_the_supernode_routes(gated):
    for route in FLEET_ROUTES:
        # an empty, unsigned request: the SuperLink itself answers (and refuses it), not nginx
        status, body = _request(gated.fleet_port, gated.ca, "POST", f"/v1/fleet/{route}")
        assert not _is_nginx_refusal(status, body) and status not in (502, 504), (
            route, status, body[:300])
    # and those are exactly the paths flower-supernode calls (flwr 1.42)
    from flwr.supernode import fleet_http_client

    called = set(re.findall(r'path="/v1/fleet/([a-z-]+)"', inspect.getsource(fleet_http_client)))
    assert called == set(FLEET_ROUTES)


def test_admin_listener_serves_only_the_control_api(gated):
    ca = gated.ca
    status, body = _request(gated.admin_port, ca, "POST", "/v1/control/list-nodes")
    assert not _is_nginx_refusal(status, body) and status < 500, (status, body[:300])
    status, _ = _request(gated.admin_port, ca, "GET", "/health")
    assert status == 200
    for target in ("/v1/fleet/pull-messages", "/v1/runtime/get-nodes", "/v1/runtime/acquire-task",
                   "/v1/control/../runtime/get-nodes", "/docs"):
        status, body = _request(gated.admin_port, ca, "POST", target)
        assert _is_nginx_refusal(status, body), (target, status, body[:300])


def test_register_refused_on_fleet_listener_works_on_admin_listener(gated):
    key = gated.key("via-fleet-listener.pub")
    out = subprocess.run(["flwr", "supernode", "register", str(key), "public"], cwd=ROOT,
                         env=local.flwr_env(gated.public_home), text=True, capture_output=True,
                         timeout=120)
    assert out.returncode != 0, out.stdout + out.stderr
    assert "registered successfully" not in out.stdout
    listed = subprocess.run(["flwr", "supernode", "list", "public", "--format", "json"],
                            cwd=ROOT, env=local.flwr_env(gated.public_home), text=True,
                            capture_output=True, timeout=120)
    assert listed.returncode != 0 or '"nodes"' not in listed.stdout, listed.stdout
    assert gated.nodes() == []  # the admin listener: nothing was registered through the other
    gated.register("supernode-0")  # (b): the same call on the admin listener
    nodes = gated.nodes()
    assert len(nodes) == 1 and nodes[0]["status"] == "registered", nodes


def test_supernode_connects_through_fleet_listener(gated):
    if not gated.nodes():
        gated.register("supernode-0")
    t0 = time.time()
    gated.start_supernode(0)
    online = gated.wait_online(1, timeout=60)
    assert len(online) == 1
    access = (gated.gateway_dir / "access.log").read_text()
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 200' in access
    assert '"POST /v1/fleet/pull-messages HTTP/1.1" 200' in access
    log = gated.log_tail("supernode-0", 100_000)
    assert gated.fleet_address in " ".join(gated.procs["supernode-0"].args)
    assert "Traceback" not in log, log
    print(f"SuperNode online through the gateway in {time.time() - t0:.1f} s; nodes: "
          + json.dumps(online))
