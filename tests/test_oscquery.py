"""OSCQuery as a client sees it: the namespace, the HTTP answers, LISTEN over the WebSocket, and mDNS."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.frames import Frame, Opcode
from websockets.sync.client import connect

from bridge import osc, osc_codec, oscquery, params
from bridge.state import StateStore

PARAMS = params.schema_params(["detail"], 2)
VALUES = params.defaults()
NAMESPACE = oscquery.tree(PARAMS, VALUES, "test")
INFO = oscquery.host_info("test", "127.0.0.1", 9100)
LIST_PARAMS = {p.name for p in PARAMS if p.kind is tuple}


def methods(node: dict) -> list[dict]:
    """Every node below `node` that is an OSC method (has a TYPE), depth first."""
    found = [node] if "TYPE" in node else []
    for child in node.get("CONTENTS", {}).values():
        found += methods(child)
    return found


def at(path: str, namespace: dict = NAMESPACE) -> dict:
    node = namespace
    for part in filter(None, path.split("/")):
        node = node["CONTENTS"][part]
    return node


# ---------------------------------------------------------------------------- the namespace
def test_every_parameter_but_the_list_ones_is_one_method_at_its_osc_address():
    assert LIST_PARAMS == {"prompts", "seeds", "t_index_list"}
    paths = [node["FULL_PATH"] for node in methods(NAMESPACE)]
    assert sorted(paths) == sorted(["/" + p.name for p in PARAMS if p.name not in LIST_PARAMS] + ["/resolution"])


def test_list_parameters_are_left_out_of_the_namespace_and_of_listen():
    # a VALUE with more (or fewer) items than TYPE has tags makes strict clients refuse the tree
    for name in LIST_PARAMS:
        assert name not in NAMESPACE["CONTENTS"]
        assert "/" + name not in oscquery.addresses(PARAMS)
        assert "/" + name not in oscquery.arguments(PARAMS, VALUES)


def test_every_method_is_read_write_and_described_by_its_parameter():
    for p in PARAMS:
        if p.name in LIST_PARAMS:
            continue
        node = at(p.name)
        assert node["FULL_PATH"] == "/" + p.name and node["ACCESS"] == 3
        assert node["DESCRIPTION"] == p.doc
        assert "CONTENTS" not in node


def test_the_addresses_are_the_methods_of_the_namespace_and_what_listen_sends():
    paths = {node["FULL_PATH"] for node in methods(NAMESPACE)}
    assert oscquery.addresses(PARAMS) == paths == set(oscquery.arguments(PARAMS, VALUES))


def test_a_name_osc_does_not_allow_in_an_address_is_left_out():
    allowed = ["ok", "sub/dir", "100%", "a-b_c.d~"]
    refused = ["my style", "a#b", "x*", "a,b", "q?", "[1]", "{x}", "café", "tab\t", "a//b", "end/"]
    parameters = params.schema_params(allowed + refused)
    namespace = oscquery.tree(parameters, VALUES, "test")
    loras = {node["FULL_PATH"] for node in methods(namespace) if node["FULL_PATH"].startswith("/lora/")}
    assert loras == {"/lora/" + name for name in allowed}
    assert {a for a in oscquery.addresses(parameters) if a.startswith("/lora/")} == loras
    assert {a for a in oscquery.arguments(parameters, VALUES) if a.startswith("/lora/")} == loras


@pytest.mark.parametrize("name, type_, value, range_, clipmode", [
    ("strength", "f", [0.5], [{"MIN": 0.0, "MAX": 1.0}], ["both"]),
    ("steps", "i", [1], [{"MIN": 1, "MAX": 50}], ["both"]),
    ("seed", "i", [2], [{"MIN": -1, "MAX": params.INT32_MAX}], ["both"]),
    ("mode", "s", ["img2img"], [{"VALS": ["img2img", "txt2img"]}], None),
    ("prompt", "s", [params.BY_NAME["prompt"].default], None, None),
    ("pause", "T", [False], None, None),
    ("lora/detail", "f", [0.0], [{"MIN": -5.0, "MAX": 5.0}], ["both"]),
    ("controlnet/1/end", "f", [1.0], [{"MIN": 0.0, "MAX": 1.0}], ["both"]),
])
def test_a_method_carries_type_value_range_and_clipmode(name, type_, value, range_, clipmode):
    node = at(name)
    assert (node["TYPE"], node["VALUE"], node.get("RANGE"), node.get("CLIPMODE")) == (type_, value, range_, clipmode)


def test_value_is_the_current_state():
    values = {**VALUES, "strength": 0.25, "prompt": "a cat", "pause": True, "width": 640, "lora/detail": 0.8}
    namespace = oscquery.tree(PARAMS, values, "test")
    assert at("strength", namespace)["VALUE"] == [0.25]
    assert at("prompt", namespace)["VALUE"] == ["a cat"]
    assert at("pause", namespace)["VALUE"] == [True]
    assert at("lora/detail", namespace)["VALUE"] == [0.8]
    assert at("resolution", namespace)["VALUE"] == [640, 512]


def test_a_parameter_the_state_does_not_hold_shows_its_default():
    assert "controlnet/0/scale" not in VALUES and at("controlnet/0/scale")["VALUE"] == [1.0]


def test_resolution_sets_width_and_height_with_their_ranges():
    node = at("resolution")
    assert node["TYPE"] == "ii" and node["ACCESS"] == 3 and node["VALUE"] == [512, 512]
    assert node["RANGE"] == [{"MIN": 64, "MAX": 4096}, {"MIN": 64, "MAX": 4096}]


def test_names_with_slashes_become_nested_containers():
    assert {k: v for k, v in NAMESPACE.items() if k != "CONTENTS"} == {
        "FULL_PATH": "/", "ACCESS": 0, "DESCRIPTION": NAMESPACE["DESCRIPTION"]}
    lora, cn = at("lora"), at("controlnet")
    assert (lora["FULL_PATH"], lora["ACCESS"], list(lora["CONTENTS"])) == ("/lora", 0, ["detail"])
    assert (cn["FULL_PATH"], cn["ACCESS"], list(cn["CONTENTS"])) == ("/controlnet", 0, ["0", "1"])
    for k in ("0", "1"):
        node = at(f"controlnet/{k}")
        assert node["FULL_PATH"] == f"/controlnet/{k}" and node["ACCESS"] == 0 and "TYPE" not in node
        assert list(node["CONTENTS"]) == ["scale", "start", "end"]
        assert node["CONTENTS"]["scale"]["FULL_PATH"] == f"/controlnet/{k}/scale"


def test_norm_addresses_are_not_listed():
    assert "norm" not in NAMESPACE["CONTENTS"]


def test_the_namespace_is_json():
    assert json.loads(json.dumps(NAMESPACE)) == NAMESPACE


def test_listened_values_are_osc_messages_the_osc_server_takes_back():
    values = {**VALUES, "prompts": (("a", 1.0), ("b", 0.5)), "pause": True, "seeds": ((3, 1.0), (4, 2.0))}
    for address, args in oscquery.arguments(PARAMS, values).items():
        [(decoded_address, decoded)] = osc.decode(osc_codec.message(address, *args))
        changes = osc.message_changes(decoded_address, decoded)
        for name, value in changes.items():
            assert value == values.get(name, params.lookup(name).default), address  # all exact in float32


# ---------------------------------------------------------------------------- answering requests
def test_a_path_answers_its_whole_subtree():
    assert oscquery.respond("/", NAMESPACE, INFO) == (200, NAMESPACE)
    assert oscquery.respond("/controlnet/0", NAMESPACE, INFO) == (200, at("controlnet/0"))
    assert oscquery.respond("/strength", NAMESPACE, INFO) == (200, at("strength"))


def test_an_attribute_query_answers_that_attribute_alone():
    assert oscquery.respond("/strength?VALUE", NAMESPACE, INFO) == (200, {"VALUE": [0.5]})
    assert oscquery.respond("/mode?RANGE", NAMESPACE, INFO) == (200, {"RANGE": [{"VALS": ["img2img", "txt2img"]}]})
    assert oscquery.respond("/lora?ACCESS", NAMESPACE, INFO) == (200, {"ACCESS": 0})


def test_an_attribute_that_does_not_apply_to_a_node_answers_an_empty_object():
    assert oscquery.respond("/lora?TYPE", NAMESPACE, INFO) == (200, {})
    assert oscquery.respond("/prompt?RANGE", NAMESPACE, INFO) == (200, {})


def test_value_of_a_container_is_no_content():
    assert oscquery.respond("/controlnet?VALUE", NAMESPACE, INFO) == (204, None)


@pytest.mark.parametrize("target", ["/nope", "/nope?TYPE", "/strength/more", "/lora/missing"])
def test_a_path_without_a_node_is_not_found(target):
    assert oscquery.respond(target, NAMESPACE, INFO) == (404, None)


@pytest.mark.parametrize("attribute", ["FOO", "UNIT", "TAGS", "HTML", "value"])
def test_an_unknown_or_unsupported_attribute_is_a_bad_request(attribute):
    assert oscquery.respond(f"/strength?{attribute}", NAMESPACE, INFO) == (400, None)


@pytest.mark.parametrize("path", ["/", "/strength", "/nope"])
def test_host_info_answers_whatever_the_path(path):
    assert oscquery.respond(f"{path}?HOST_INFO", NAMESPACE, INFO) == (200, INFO)


def test_paths_are_url_decoded_and_trailing_slashes_and_fragments_ignored():
    namespace = oscquery.tree(params.schema_params(["100%"]), VALUES, "test")
    assert oscquery.respond("/lora/100%25?VALUE", namespace, INFO) == (200, {"VALUE": [0.0]})
    assert oscquery.respond("/lora/", namespace, INFO)[1]["FULL_PATH"] == "/lora"
    assert oscquery.respond("/strength#frag", namespace, INFO)[0] == 200


def test_host_info_tells_where_osc_goes_and_what_is_supported():
    assert INFO["NAME"] == "test"
    assert (INFO["OSC_IP"], INFO["OSC_PORT"], INFO["OSC_TRANSPORT"]) == ("127.0.0.1", 9100, "UDP")
    supported = {k for k, v in INFO["EXTENSIONS"].items() if v}
    assert supported == {"ACCESS", "VALUE", "RANGE", "DESCRIPTION", "CLIPMODE", "LISTEN", "PATH_CHANGED"}


def test_host_info_leaves_out_an_unroutable_osc_ip():
    assert "OSC_IP" not in oscquery.host_info("test", "0.0.0.0", 9100)


def test_listen_and_ignore_commands_are_read_and_anything_else_refused():
    assert oscquery.listen_command('{"COMMAND":"LISTEN","DATA":"/strength"}') == ("LISTEN", "/strength")
    assert oscquery.listen_command('{"COMMAND":"IGNORE","DATA":"/lora/detail"}') == ("IGNORE", "/lora/detail")
    for bad in ["nope", "[]", '{"COMMAND":"SHOUT","DATA":"/x"}', '{"COMMAND":"LISTEN"}', '{"COMMAND":"LISTEN","DATA":3}']:
        with pytest.raises(oscquery.OscQueryError):
            oscquery.listen_command(bad)


# ---------------------------------------------------------------------------- the server
class Served:
    """An OscQueryServer on its own asyncio thread (as in the daemon), over a real StateStore; binary
    OSC over the WebSocket is applied to the store, as the daemon's OSC server would."""

    def __init__(self):
        self.store = StateStore()
        self.loras = ["detail"]
        self.folders_free = threading.Event()  # clear it to make parameters() wait, as on a models folder
        self.folders_free.set()                # that a loading thread holds
        self.listing_waits = threading.Event()  # set once parameters() waits
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = oscquery.OscQueryServer(self.parameters, self.values, "test", "127.0.0.1", 9100,
                                              on_osc=lambda data, source: self.store.apply(osc.read_packet(data).changes))
        self.run(self.server.start("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.port}"

    def parameters(self):
        if not self.folders_free.is_set():
            self.listing_waits.set()
            self.folders_free.wait(10)
        return params.schema_params(self.loras, 2)

    def values(self):
        snapshot = self.store.snapshot()
        return snapshot.version, snapshot.values

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(5)

    def close(self):
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def get(url: str, headers: dict[str, str] | None = None):
    """(status, parsed JSON or None, headers) of a GET."""
    try:
        with _opener.open(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
            body = response.read()
            return response.status, json.loads(body) if body else None, response.headers
    except urllib.error.HTTPError as e:
        return e.code, None, e.headers


def test_http_serves_the_namespace_of_the_current_state(served):
    status, body, headers = get(served.url + "/")
    expected = oscquery.tree(served.parameters(), served.store.snapshot().values, "test")
    assert status == 200 and body == json.loads(json.dumps(expected))
    assert headers["Content-Type"] == "application/json"
    assert "Access-Control-Allow-Origin" not in headers  # no page from another site may read it (below)


def test_http_value_follows_the_state(served):
    served.store.apply({"strength": 0.25})
    assert get(served.url + "/strength?VALUE")[:2] == (200, {"VALUE": [0.25]})


def test_http_answers_host_info_and_the_error_statuses(served):
    assert get(served.url + "/?HOST_INFO")[1]["OSC_PORT"] == 9100
    assert get(served.url + "/nope")[0] == 404
    assert get(served.url + "/strength?FOO")[0] == 400
    assert get(served.url + "/lora?VALUE")[0] == 204


def test_a_taken_port_fails_with_a_message_naming_it(served):
    other = oscquery.OscQueryServer(served.parameters, served.values, "test", "127.0.0.1", 9100)
    with pytest.raises(OSError, match=f"127.0.0.1:{served.server.port}"):
        served.run(other.start("127.0.0.1", served.server.port))


def test_closing_is_quick_even_with_a_client_that_keeps_its_connection_open(served):
    idle = socket.create_connection(("127.0.0.1", served.server.port))
    idle.sendall(b"GET /strength HTTP/1.1\r\nHost: x\r\n\r\n")  # and never closes its end
    with connect(served.url.replace("http", "ws") + "/"):
        started = time.monotonic()
        served.run(served.server.close())
        assert time.monotonic() - started < 2
    idle.close()


def receive_osc(ws, timeout: float = 0.3):
    """The next binary message as [(address, args)], or None if none comes within `timeout`."""
    try:
        message = ws.recv(timeout=timeout)
    except TimeoutError:
        return None
    assert isinstance(message, bytes), message
    return osc.decode(message)


def first_osc_after(ws, served, make_change, attempts: int = 15):
    """Change the state until an OSC message arrives (the server reads LISTEN asynchronously)."""
    for i in range(attempts):
        served.store.apply(make_change(i))
        message = receive_osc(ws)
        if message is not None:
            return i, message
    raise AssertionError("no OSC message from the server")


def test_listen_streams_a_changed_value_as_osc(served):
    with connect(served.url.replace("http", "ws") + "/") as ws:
        ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/strength"}))
        i, message = first_osc_after(ws, served, lambda i: {"strength": 0.1 + i / 100})
        [(address, args)] = message
        assert address == "/strength" and args == [pytest.approx(0.1 + i / 100)]


def test_listen_sends_only_the_listened_nodes(served):
    with connect(served.url.replace("http", "ws") + "/") as ws:
        ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/prompt"}))
        ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/pause"}))
        first_osc_after(ws, served, lambda i: {"pause": bool(i % 2 == 0)})
        served.store.apply({"seed": 5})
        assert receive_osc(ws) is None
        served.store.apply({"prompt": "a cat"})
        assert receive_osc(ws) == [("/prompt", ["a cat"])]


def test_ignore_stops_a_listened_node(served):
    with connect(served.url.replace("http", "ws") + "/") as ws:
        ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/strength"}))
        first_osc_after(ws, served, lambda i: {"strength": 0.1 + i / 100})
        ws.send(json.dumps({"COMMAND": "IGNORE", "DATA": "/strength"}))
        ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/seed"}))  # read after the IGNORE: a marker
        for i in range(15):
            served.store.apply({"strength": 0.5 + i / 100, "seed": 100 + i})
            message = receive_osc(ws)
            if message and message[0][0] == "/seed":
                break
        served.store.apply({"strength": 0.9, "seed": 7})
        assert receive_osc(ws) == [("/seed", [7])]
        assert receive_osc(ws) is None


def test_a_new_parameter_is_announced_with_path_changed(served):
    with connect(served.url.replace("http", "ws") + "/") as ws:
        time.sleep(0.1)  # let the server take its baseline
        served.loras.append("glow")
        served.store.apply({"lora/glow": 0.5})
        assert json.loads(ws.recv(timeout=2)) == {"COMMAND": "PATH_CHANGED", "DATA": "/"}
    assert get(served.url + "/lora/glow?VALUE")[1] == {"VALUE": [0.5]}


def test_osc_sent_over_the_websocket_reaches_the_osc_handling(served):
    with connect(served.url.replace("http", "ws") + "/") as ws:
        ws.send(osc_codec.message("/strength", 0.75))
        end = time.monotonic() + 3
        while served.store.snapshot()["strength"] != 0.75 and time.monotonic() < end:
            time.sleep(0.02)
    assert served.store.snapshot()["strength"] == 0.75


def ws_url(served) -> str:
    return served.url.replace("http", "ws") + "/"


def handshake(port: int, headers: dict[str, str]) -> bytes:
    """A WebSocket opening handshake as a client sends it, with `headers` added or replacing its own."""
    fields = {"Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "Sec-WebSocket-Version": "13",
              **headers}
    return ("GET / HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n").encode()


def client_frame(message: str | bytes) -> bytes:
    """One WebSocket message as a client sends it (masked)."""
    opcode = Opcode.TEXT if isinstance(message, str) else Opcode.BINARY
    return Frame(opcode, message.encode() if isinstance(message, str) else message).serialize(mask=True)


def response_status(sock: socket.socket) -> int:
    """The status of the HTTP response that `sock` receives (its head only is read)."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(1)
        assert data, f"connection closed after {head!r}"
        head += data
    return int(head.split()[1])


@pytest.mark.parametrize("headers, status, applied", [
    ({}, 101, True),  # an application (VDMX, Chataigne...): no Origin
    ({"Origin": "http://evil.example"}, 403, False),  # a page on any website, open in the show machine's browser
    ({"Host": "rebind.evil.example:{port}"}, 403, False),  # a website's name resolved to this machine (DNS rebinding)
])
def test_osc_over_the_websocket_is_taken_only_from_this_machines_clients(served, headers, status, applied):
    port = served.server.port
    headers = {k: v.format(port=port) for k, v in headers.items()}  # {port}: the server's
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        # the OSC right behind the handshake, as a client that does not wait for the answer sends it
        sock.sendall(handshake(port, headers) + client_frame(osc_codec.message("/strength", 0.75)))
        assert response_status(sock) == status
        time.sleep(0.3)
    assert (served.store.snapshot()["strength"] == 0.75) is applied


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Host": "rebind.evil.example:{port}"}])
def test_a_page_from_another_site_cannot_read_the_namespace(served, headers):
    served.store.apply({"prompt": "a secret prompt"})
    headers = {k: v.format(port=served.server.port) for k, v in headers.items()}
    assert get(served.url + "/prompt?VALUE", headers)[:2] == (403, None)


def test_listen_takes_only_the_nodes_that_exist_when_it_comes(served):
    with connect(ws_url(served)) as ws:
        ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/lora/glow"}))  # no such LoRA yet
        ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/strength"}))  # read after it: a marker
        first_osc_after(ws, served, lambda i: {"strength": 0.1 + i / 100})
        served.loras.append("glow")
        served.store.apply({"lora/glow": 0.5})
        assert json.loads(ws.recv(timeout=2)) == {"COMMAND": "PATH_CHANGED", "DATA": "/"}
        assert receive_osc(ws) is None
        ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/lora/glow"}))  # now it exists
        _, message = first_osc_after(ws, served, lambda i: {"lora/glow": 1.0 + i / 10})
        assert message[0][0] == "/lora/glow"


# ---------------------------------------------------------------------------- a client that stops reading
LONG = "\N{CONTROL KNOBS}" * 4096  # the longest prompt, 4 bytes a character in UTF-8: 16 KiB


def stuck_listener(port: int, *addresses: str) -> socket.socket:
    """A WebSocket client that LISTENs to `addresses` and then never reads, with a receive buffer of a
    few KiB: what the server sends it soon waits on the server's side."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting, so it holds
    sock.connect(("127.0.0.1", port))
    sock.sendall(handshake(port, {}))
    assert response_status(sock) == 101
    for address in addresses:
        sock.sendall(client_frame(json.dumps({"COMMAND": "LISTEN", "DATA": address})))
    return sock


def send_buffer_max() -> int:
    """The most the kernel buffers for sending on one TCP connection (Linux: tcp_wmem's maximum)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


def flood_past_a_stuck_listener(served, ws) -> None:
    """Change the prompts to long texts, each time with a strength that `ws` (LISTENing to /strength)
    must receive, until far more than the kernel and websockets buffer for one connection went to
    a client listening to the prompts that never reads."""
    served.store.apply({"prompt": LONG, "negative_prompt": LONG, "styles": LONG[:1024]})
    per_change = len(LONG.encode()) * 2 + len(LONG[:1024].encode())
    changes = int(1.25 * (send_buffer_max() + (256 << 10)) / per_change)
    for i in range(changes):
        strength = (i % 1000) / 1000
        served.store.apply({"prompt": f"{i}{LONG}"[:4096], "negative_prompt": f"{i}{LONG}"[:4096],
                            "styles": f"{i}{LONG}"[:1024], "strength": strength})
        end = time.monotonic() + 2
        while receive_osc(ws, max(0.0, end - time.monotonic())) != [("/strength", [pytest.approx(strength)])]:
            assert time.monotonic() < end, f"change {i} of {changes}: no /strength for 2 s"


@contextlib.contextmanager
def flooded_while_one_listener_is_stuck(served):
    """A client that LISTENs to the prompts and never reads, and a WebSocket LISTENing to /strength
    (yielded) that got every change while the prompts' changes flooded past the stuck one's buffers."""
    stuck = stuck_listener(served.server.port, "/prompt", "/negative_prompt", "/styles")
    try:
        with connect(ws_url(served)) as ws:
            ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/strength"}))
            first_osc_after(ws, served, lambda i: {"strength": 0.9 - i / 100})
            flood_past_a_stuck_listener(served, ws)
            yield ws
    finally:
        stuck.close()


def test_a_client_that_stops_reading_holds_up_only_itself(served):
    with flooded_while_one_listener_is_stuck(served):
        pass  # every /strength arrived in time (checked while flooding)


def test_closing_is_quick_even_with_a_client_that_stopped_reading(served):
    with flooded_while_one_listener_is_stuck(served):
        started = time.monotonic()
        served.run(served.server.close())
        assert time.monotonic() - started < 3


# ---------------------------------------------------------------------------- a slow parameter listing
def osc_gets_through(served) -> bool:
    """Whether OSC over a new WebSocket connection is applied within 2 s: the I/O loop is free."""
    try:
        with connect(ws_url(served), open_timeout=2) as ws:
            ws.send(osc_codec.message("/strength", 0.75))
            end = time.monotonic() + 2
            while served.store.snapshot()["strength"] != 0.75 and time.monotonic() < end:
                time.sleep(0.02)
    except TimeoutError:
        return False
    return served.store.snapshot()["strength"] == 0.75


def test_a_slow_parameter_listing_for_an_http_request_holds_up_no_one_else(served):
    answers = []
    served.folders_free.clear()
    request = threading.Thread(target=lambda: answers.append(get(served.url + "/strength?VALUE")))
    try:
        request.start()
        assert served.listing_waits.wait(2)
        assert osc_gets_through(served)
    finally:
        served.folders_free.set()
        request.join(5)
    assert answers[0][:2] == (200, {"VALUE": [0.5]})  # the state when it asked


def test_a_slow_parameter_listing_for_listen_holds_up_no_one_else(served):
    with connect(ws_url(served)) as ws:
        ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/seed"}))
        first_osc_after(ws, served, lambda i: {"seed": 100 + i})
        served.folders_free.clear()
        try:
            served.store.apply({"seed": 7})  # the server lists the parameters again
            assert served.listing_waits.wait(2)
            assert osc_gets_through(served)
        finally:
            served.folders_free.set()
        assert receive_osc(ws, 2) == [("/seed", [7])]


# ---------------------------------------------------------------------------- mDNS
def test_mdns_advertises_the_oscquery_and_osc_ports_on_loopback():
    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

    instance = f"t{os.getpid()}"
    wanted = {f"sdbridge-{instance}.{t}" for t in (oscquery.OSCJSON_TYPE, oscquery.OSC_TYPE)}
    seen: dict[str, list] = {}

    def on_change(zeroconf, service_type, name, state_change):
        seen.setdefault(name, []).append(state_change)

    browser_zc = Zeroconf(interfaces=["127.0.0.1"])
    browser = ServiceBrowser(browser_zc, [oscquery.OSCJSON_TYPE, oscquery.OSC_TYPE], handlers=[on_change])
    advertiser = oscquery.Advertiser(instance, "127.0.0.1", 9103, 9100)
    try:
        started = time.monotonic()
        advertiser.start()
        assert time.monotonic() - started < 0.5  # registration goes on in the background
        end = time.monotonic() + 10
        while not wanted <= set(seen) and time.monotonic() < end:
            time.sleep(0.05)
        assert wanted <= set(seen)
        query = browser_zc.get_service_info(oscquery.OSCJSON_TYPE, f"sdbridge-{instance}.{oscquery.OSCJSON_TYPE}", 3000)
        assert query.port == 9103 and query.parsed_addresses() == ["127.0.0.1"]
        assert browser_zc.get_service_info(oscquery.OSC_TYPE, f"sdbridge-{instance}.{oscquery.OSC_TYPE}", 3000).port == 9100

        closing = time.monotonic()
        advertiser.close()
        assert time.monotonic() - closing < 2.5
        end = time.monotonic() + 3
        while not all(ServiceStateChange.Removed in seen[name] for name in wanted) and time.monotonic() < end:
            time.sleep(0.05)
        assert all(ServiceStateChange.Removed in seen[name] for name in wanted)  # goodbye packets went out
    finally:
        advertiser.close()
        browser.cancel()
        browser_zc.close()


def test_mdns_close_is_quick_and_safe_whatever_start_reached(caplog):
    never_started = oscquery.Advertiser(f"n{os.getpid()}", "127.0.0.1", 9103, 9100)
    never_started.close()
    just_started = oscquery.Advertiser(f"j{os.getpid()}", "127.0.0.1", 9103, 9100)
    just_started.start()
    started = time.monotonic()
    just_started.close()
    assert time.monotonic() - started < 2.5
    unusable = oscquery.Advertiser(f"u{os.getpid()}", "::1", 9103, 9100)
    unusable.start()  # never raises: a show must not fail to start for mDNS
    unusable._thread.join(5)
    unusable.close()
    assert "mDNS advertising off" in caplog.text and "::1" in caplog.text


# ---------------------------------------------------------------------------- the daemon
def test_the_daemon_serves_its_parameters_over_oscquery(daemon):
    url = f"http://127.0.0.1:{daemon.oscquery_port}"
    status, namespace, _ = get(url + "/")
    assert status == 200
    paths = {node["FULL_PATH"] for node in methods(namespace)}
    assert {"/" + p.name for p in params.PARAMS if p.kind is not tuple} | {"/resolution"} <= paths
    assert not paths & {"/prompts", "/seeds", "/t_index_list"}
    assert at("width", namespace)["VALUE"] == [128] and at("resolution", namespace)["VALUE"] == [128, 128]
    assert get(url + "/?HOST_INFO")[1]["OSC_PORT"] == daemon.osc_port
    daemon.send("/strength", 0.3)
    end = time.monotonic() + 5
    while get(url + "/strength?VALUE")[1] != {"VALUE": [pytest.approx(0.3)]} and time.monotonic() < end:
        time.sleep(0.05)
    assert get(url + "/strength?VALUE")[1] == {"VALUE": [pytest.approx(0.3)]}


def test_the_daemon_streams_what_osc_changes_to_listeners(daemon):
    with connect(f"ws://127.0.0.1:{daemon.oscquery_port}/") as ws:
        ws.send(json.dumps({"COMMAND": "LISTEN", "DATA": "/guidance_scale"}))
        for i in range(15):  # the daemon reads LISTEN asynchronously: change until a message comes
            daemon.send("/guidance_scale", 2.0 + i)
            message = receive_osc(ws)
            if message is not None:
                break
        assert message is not None, "no OSC message from the daemon"
        [(address, args)] = message
        assert address == "/guidance_scale" and args[0] in [2.0 + k for k in range(i + 1)]
