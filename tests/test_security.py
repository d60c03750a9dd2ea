"""Who may play the daemon (docs/reliability.md, "Attacks"): listeners on 127.0.0.1 by default; bound to
the network, other machines need the token (HTTP, WebSocket) or a place in osc_allow (OSC, OSCQuery);
per-client rates; names that never leave their folders; pickles refused; no shell, ever.

A stranger on the network is played by this machine's own network address: a connection to it comes
from it, so the daemon sees a peer that is not loopback.
"""
from __future__ import annotations

import ast
import http.client
import json
import os
import socket
import stat
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from bridge import access, osc_codec
from bridge.access import Access, AccessError, RateLimit
from bridge.config import ConfigError, Settings

from .conftest import MACHINE_ADDRESSES, ROOT, DaemonProcess, gradient, wait

TOKEN = "a-token-for-the-tests-0123456789"
needs_address = pytest.mark.skipif(not MACHINE_ADDRESSES, reason="this machine has no network address but loopback")


def _request(address: str, port: int, path: str, headers: dict | None = None) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(address, port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def _state(d: DaemonProcess) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", d.http_port, timeout=10)
    connection.request("GET", "/api/state")
    return json.loads(connection.getresponse().read())


def _send_from(address: str, port: int, data: bytes, count: int = 1) -> None:
    """Datagrams to the daemon's OSC port from `address` (this machine's network address: a stranger)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        for _ in range(count):
            sock.sendto(data, (address, port))


def _sockets(pid: int) -> list[tuple[str, str, int]]:
    """(kind, local address, port) of every TCP socket listening and every UDP socket bound in process
    `pid` (Linux: its file descriptors matched to /proc/net/tcp, udp and their IPv6 tables)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for kind in ("tcp", "udp", "tcp6", "udp6"):
        for line in Path(f"/proc/net/{kind}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[9] in inodes and (kind.startswith("udp") or fields[3] == "0A"):  # 0A: LISTEN
                raw = bytes.fromhex(address)
                ip = (socket.inet_ntop(socket.AF_INET, raw[::-1]) if len(raw) == 4 else
                      socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
                found.append((kind, ip, int(port, 16)))
    return found


# ----------------------------------------------------------------------------- the rules, pure
def test_loopback_addresses_are_this_machine_and_others_are_not():
    assert all(access.is_loopback(a) for a in ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1", "localhost"))
    assert not any(access.is_loopback(a) for a in ("0.0.0.0", "192.168.1.20", "::ffff:10.0.0.1", "", "example.com"))


def test_osc_from_another_machine_needs_its_place_in_the_allow_list():
    rules = Access("0.0.0.0", TOKEN, ["192.168.1.0/24", "10.0.0.7"])
    assert rules.osc_allowed("127.0.0.1") and rules.osc_allowed("192.168.1.44") and rules.osc_allowed("10.0.0.7")
    assert rules.osc_allowed("::ffff:192.168.1.44")
    assert not rules.osc_allowed("10.0.0.8") and not rules.osc_allowed("192.168.2.1") and not rules.osc_allowed("x")
    assert not Access("0.0.0.0", TOKEN).osc_allowed("192.168.1.44")  # an empty list: this machine only


def test_the_token_is_asked_only_of_other_machines_and_only_when_exposed():
    exposed, local = Access("0.0.0.0", TOKEN), Access("127.0.0.1")
    assert exposed.needs_token("192.168.1.44") and not exposed.needs_token("127.0.0.1")
    assert not local.needs_token("192.168.1.44")  # bound to loopback: nobody else can even connect
    assert exposed.token_matches(TOKEN)
    assert not any(exposed.token_matches(t) for t in (None, "", TOKEN[:-1], TOKEN + "x", "é" * 32))
    assert not Access("0.0.0.0").token_matches("")  # no token set: nothing matches


def test_a_bad_token_or_allow_list_entry_stops_the_daemon_before_it_starts():
    with pytest.raises(ConfigError, match="at least 16"):
        Settings(host="0.0.0.0", token="short")
    with pytest.raises(ConfigError, match="osc_allow entry 'phone'"):
        Settings(host="0.0.0.0", osc_allow=("phone",))
    with pytest.raises(AccessError):
        access.parse_networks(["300.1.1.1"])


def test_a_made_token_is_kept_for_this_user_only_and_reused(tmp_path):
    path = tmp_path / "sdbridge" / "token"
    token = access.kept_token(path)
    assert len(token) >= access.MIN_TOKEN_LENGTH and access.kept_token(path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 or os.name == "nt"
    path.write_text("short\n")  # spoiled by hand: a new one replaces it
    assert access.kept_token(path) not in ("short", token)


def test_a_client_gets_its_burst_then_its_rate_and_the_drops_are_reported_once_a_second():
    now = [100.0]
    limit = RateLimit(10, clock=lambda: now[0])
    assert [limit.allow("a") for _ in range(12)] == [True] * 10 + [False] * 2
    assert limit.allow("b")  # another client has its own allowance
    assert limit.report_due("a") == 2 and limit.report_due("a") == 0  # reported, then quiet for a second
    now[0] += 0.5  # half a second: five more
    assert [limit.allow("a") for _ in range(6)] == [True] * 5 + [False]
    assert limit.report_due("a") == 0
    now[0] += 0.6
    assert limit.report_due("a") == 1 and limit.dropped == 3
    assert all(RateLimit(0).allow("a") for _ in range(10_000))  # 0: no limit


def test_the_rate_limit_remembers_a_bounded_number_of_clients():
    limit = RateLimit(1)
    for port in range(access.MAX_RATE_KEYS * 3):  # a flood from ever new source ports
        limit.allow(("osc", port))
    assert len(limit._buckets) == access.MAX_RATE_KEYS


# ----------------------------------------------------------------------------- listeners
@pytest.fixture(scope="module")
def local():
    """A daemon with the default host, and a low rate limit for the flood tests."""
    d = DaemonProcess("--max-message-rate", "50", "--mdns").wait_started()  # mdns as by default
    yield d
    d.stop()


def test_every_listener_binds_to_loopback_by_default(local):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads the process's sockets from Linux's /proc")
    d = local
    sockets = _sockets(d.proc.pid)
    assert {("udp", d.osc_port), ("tcp", d.http_port), ("tcp", d.oscquery_port)} <= {(k, p) for k, _, p in sockets}
    assert all(ip == "127.0.0.1" for _, ip, _ in sockets), sockets  # telemetry's and mDNS's too: none elsewhere
    for address in MACHINE_ADDRESSES:  # and so a stranger cannot even connect
        with pytest.raises(ConnectionRefusedError):
            _request(address, d.http_port, "/api/state")


@pytest.fixture(scope="module")
def exposed():
    """A daemon bound to every network with a token, allowing OSC from nobody else; and one stranger's address."""
    if not MACHINE_ADDRESSES:
        pytest.skip("this machine has no network address but loopback")
    d = DaemonProcess("--host", "0.0.0.0", "--token", TOKEN).wait_started()
    yield d, MACHINE_ADDRESSES[0]
    d.stop()


def test_another_machine_without_the_token_gets_nothing_over_http(exposed):
    d, stranger = exposed
    for path in ("/", "/api/state", "/api/schema", "/app.js", "/api/state?token=wrong-token-0123456789"):
        assert _request(stranger, d.http_port, path).status == 401, path
    assert _request(stranger, d.http_port, "/api/state", {"Authorization": "Bearer nope"}).status == 401
    assert _request("127.0.0.1", d.http_port, "/api/state").status == 200  # this machine needs no token


def test_the_token_opens_http_from_its_link_a_header_or_the_cookie_the_link_leaves(exposed):
    d, stranger = exposed
    assert _request(stranger, d.http_port, f"/api/state?token={TOKEN}").status == 200
    assert _request(stranger, d.http_port, "/api/state", {"Authorization": f"Bearer {TOKEN}"}).status == 200
    link = _request(stranger, d.http_port, f"/?token={TOKEN}")
    assert link.status == 303 and link.getheader("Location") == "/"  # the address bar loses the token
    cookie = link.getheader("Set-Cookie")
    assert cookie.startswith(f"sdbridge_token_{d.http_port}={TOKEN};") and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    page = _request(stranger, d.http_port, "/", {"Cookie": cookie.split(";")[0]})
    assert page.status == 200 and page.getheader("Content-Type").startswith("text/html")


def test_the_websocket_wants_the_token_from_another_machine(exposed):
    d, stranger = exposed
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://{stranger}:{d.http_port}/ws", open_timeout=10).close()
    assert refused.value.response.status_code == 401
    before = _state(d)["state_version"]
    for extra in ({"uri": f"ws://{stranger}:{d.http_port}/ws?token={TOKEN}"},
                  {"uri": f"ws://{stranger}:{d.http_port}/ws",
                   "additional_headers": {"Cookie": f"sdbridge_token_{d.http_port}={TOKEN}"}}):
        with connect(open_timeout=10, **extra) as ws:
            ws.send(json.dumps({"type": "set", "id": 1, "params": {"seed": 4242}}))
            assert json.loads(ws.recv(timeout=10))["type"] == "ack"
    assert _state(d)["state_version"] == before + 2 and _state(d)["params"]["seed"] == 4242


def test_osc_from_a_machine_outside_the_allow_list_changes_nothing_and_is_reported(exposed):
    d, stranger = exposed
    before = _state(d)
    since = time.monotonic()
    _send_from(stranger, d.osc_port, osc_codec.message("/seed", 777), count=5)
    assert d.telemetry.wait_for("/sdbridge/error", since, predicate=lambda a: "not in osc_allow" in a[0])
    assert d.telemetry.wait_for("/sdbridge/dropped", since, predicate=lambda a: a[0] >= 5)
    assert _state(d) == before
    _send_from("127.0.0.1", d.osc_port, osc_codec.message("/seed", 778))  # this machine always may
    wait(lambda: _state(d)["params"]["seed"] == 778, 10)


def test_oscquery_answers_only_the_machines_that_may_send_osc(exposed):
    d, stranger = exposed
    assert _request(stranger, d.oscquery_port, "/").status == 403
    assert _request("127.0.0.1", d.oscquery_port, "/").status == 200


@needs_address
def test_an_allowed_machine_plays_over_osc_and_oscquery(daemon_factory):
    stranger = MACHINE_ADDRESSES[0]
    d = daemon_factory("--host", "0.0.0.0", "--token", TOKEN, "--osc-allow", f"{stranger}/32")
    _send_from(stranger, d.osc_port, osc_codec.message("/seed", 31337))
    wait(lambda: _state(d)["params"]["seed"] == 31337, 10)
    assert _request(stranger, d.oscquery_port, "/seed").status == 200


@needs_address
def test_an_exposed_daemon_without_a_token_uses_the_kept_one_and_logs_its_link(daemon_factory, tmp_path):
    kept = access.kept_token(tmp_path / "sdbridge" / "token")  # as a daemon before this one made it
    d = daemon_factory("--host", "0.0.0.0", env={"XDG_CONFIG_HOME": str(tmp_path), "APPDATA": str(tmp_path)})
    assert f":{d.http_port}/?token={kept}" in d.log()  # the phone's bookmark still works after a restart
    assert _request(MACHINE_ADDRESSES[0], d.http_port, f"/api/state?token={kept}").status == 200


# ----------------------------------------------------------------------------- rates
def test_a_flooding_osc_client_is_held_to_its_rate_and_another_still_plays(local):
    d = local
    before = _state(d)["state_version"]
    since = time.monotonic()
    sent = 600
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
        for i in range(sent):  # 600 a second: paced, so that the kernel's buffer loses none
            flood.sendto(osc_codec.message("/strength", (i % 100) / 100), ("127.0.0.1", d.osc_port))
            time.sleep(1 / sent)
    assert d.telemetry.wait_for("/sdbridge/error", since, predicate=lambda a: "over 50 messages a second" in a[0])
    d.send("/seed", 99)  # another source: its own allowance
    wait(lambda: _state(d)["params"]["seed"] == 99, 10)
    applied = _state(d)["state_version"] - before - 1
    assert 0 < applied <= 50 + 50 * (time.monotonic() - since) + 1  # the burst, then 50 a second
    # every datagram either applied or dropped and counted (a few lost in the kernel's buffer at most)
    assert d.telemetry.wait_for("/sdbridge/dropped", since, predicate=lambda a: sent - 20 <= a[0] + applied <= sent)


def test_a_flooding_websocket_client_is_told_it_is_over_its_rate(local):
    d = local
    with connect(f"ws://127.0.0.1:{d.http_port}/ws", open_timeout=10) as ws:
        for i in range(300):
            ws.send(json.dumps({"type": "set", "id": i, "params": {"seed": i}}))
        replies = []
        end = time.monotonic() + 10
        while time.monotonic() < end and not any(r["type"] == "error" for r in replies):
            replies.append(json.loads(ws.recv(timeout=10)))
    errors = [r for r in replies if r["type"] == "error"]
    assert errors and errors[0]["error"]["code"] == "rate_limited" and "dropped" in errors[0]["error"]["message"]


# ----------------------------------------------------------------------------- names and files
@pytest.fixture
def folders(tmp_path):
    """A models folder with a LoRA, and files outside it that hostile names reach for."""
    models = tmp_path / "models"
    (models / "Lora").mkdir(parents=True)
    (models / "Stable-diffusion").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"not for the network")
    (outside / "trojan.ckpt").write_bytes(b"a pickle")
    (models / "Stable-diffusion" / "linked.safetensors").symlink_to(outside / "secret.safetensors")
    (models / "Stable-diffusion" / "old.ckpt").write_bytes(b"a pickle that could run code")
    return models, outside


def test_names_from_the_network_never_leave_their_folders_and_pickles_are_refused(daemon_factory, folders):
    models, outside = folders
    d = daemon_factory("--models-dir", str(models))
    before = _state(d)
    hostile = [("/model", "../outside/secret"), ("/model", str(outside / "secret.safetensors")),
               ("/model", "linked"), ("/model", "old"), ("/vae", str(outside / "secret.safetensors")),
               ("/lora/../outside/secret", 1.0), (f"/lora/{outside / 'secret'}", 1.0),
               ("/preset/save", "../escaped"), ("/preset/save", str(outside / "escaped")),
               ("/preset/recall", "../../etc/passwd")]
    since = time.monotonic()
    for address, value in hostile:
        d.send(address, value)
    wait(lambda: len(d.telemetry.values("/sdbridge/error", since)) >= len(hostile), 15)
    errors = d.telemetry.values("/sdbridge/error", since)
    assert _state(d) == before
    assert not list(outside.glob("escaped*")) and not list(outside.parent.glob("escaped*"))
    assert any("allow-pickle" in e[0] or "allow_pickle" in e[0] for e in errors)
    # the prompt's own LoRA syntax reaches only the LoRA folder too; the stream goes on
    since = time.monotonic()
    d.send("/prompt", "a cat <lora:../outside/secret:1>")
    frame = gradient()
    d.output_after(lambda o: d.telemetry.values("/sdbridge/error", since), frame)  # found when a frame is made
    assert "'../outside/secret' refused" in d.telemetry.values("/sdbridge/error", since)[0][0]
    fid = d.write(frame)
    assert d.output_after(lambda o: o.frame_id >= fid, frame).pixels.size


def test_no_code_runs_a_shell_or_builds_a_command_from_a_string():
    """No `shell=True`, os.system or os.popen anywhere, and every subprocess gets an argument list: a
    name from a client can never become a shell command."""
    found = []
    for package in ("bridge", "engines", "touchdesigner"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if name in ("os.system", "os.popen", "os.execl", "os.execlp", "os.spawnl", "os.spawnlp"):
                    found.append(f"{where} {name}")
                if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in node.keywords):
                    found.append(f"{where} shell=")
                if name.split(".")[-1] in ("Popen", "run", "call", "check_call", "check_output") and node.args and (
                        isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp))):
                    found.append(f"{where} {name} with a command string")
    assert not found, found


def test_the_rings_are_readable_by_this_user_only(local):
    if not Path("/dev/shm").is_dir():
        pytest.skip("POSIX shared memory in /dev/shm (Linux)")
    d = local
    for name in (d.name_in, d.name_out):
        mode = stat.S_IMODE((Path("/dev/shm") / name).stat().st_mode)
        assert mode & 0o077 == 0, oct(mode)
