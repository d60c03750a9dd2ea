"""OSCQuery: the parameter schema as a browsable OSC namespace (the Vidvox OSCQuery proposal), so that
VDMX, MadMapper, Chataigne, ossia score and other OSCQuery clients find every parameter by themselves.

Three layers, as in the rest of `bridge`:

- pure: `tree` turns the parameter schema and the current state into the namespace JSON, `respond`
  answers an HTTP request target against it (`/`, `/strength`, `/strength?VALUE`, `/?HOST_INFO`),
  `host_info` describes the server, `addresses` lists the nodes' OSC addresses, `arguments` gives every
  node's value as OSC arguments and `listen_command` reads the client's LISTEN/IGNORE messages. No
  sockets, no threads.
- `OscQueryServer`: HTTP and WebSocket on one port (the `websockets` library answers plain GETs through
  `process_request`), for this machine's clients only (`bridge.web.refuse_foreign`: no page from another
  site). Over the WebSocket a client may LISTEN to nodes and then receives a binary OSC message with a
  node's value whenever the state changes it, and a PATH_CHANGED notice when the set of parameters
  changes; a client that stops reading holds up only itself.
- `Advertiser`: mDNS/DNS-SD records `_oscjson._tcp` (this server) and `_osc._udp` (the OSC port).

What the namespace holds: one node `/<name>` per parameter of `bridge.params` (names with "/" become
nested containers: `/lora/<name>`, `/controlnet/<k>/scale`), plus the composite OSC addresses of
`bridge.osc.COMPOSITE` (`/resolution`, type "ii"). The `/norm/<name>` fader addresses are not listed:
they are another spelling of the ranged parameters (0..1 of the range), and listing them would show
every fader twice. `/preset/save|recall` are not parameters and are not listed either.

Left out of the namespace, though OSC still plays them: the list parameters (`/prompts` s f [s f ...],
`/seeds` i f [i f ...], `/t_index_list` i [i ...]), since an OSCQuery TYPE cannot say "this entry, any number
of times": a node's VALUE has one item per TYPE tag, and one that is empty or longer may make strict clients
(ossia, Chataigne) refuse the node or the whole tree. And every parameter whose name OSC 1.0 does not allow
in an address (only printable ASCII other than space # * , ? [ ] { }; a LoRA file may be called anything):
its address would be invalid for the same clients.

How parameters map onto OSCQuery attributes:

- TYPE: float "f", int "i", str "s", bool "T" (OSCQuery's boolean; clients send T or F, and the OSC
  server takes both).
- RANGE: `{"MIN", "MAX"}` for bounded numbers, `{"VALS"}` for choices, JSON null for an item without
  one. CLIPMODE "both" on every bounded number: a hint that nothing outside RANGE is used (the daemon
  refuses such a value rather than clamping it; clients that clamp on their side never send one).
- ACCESS 3 (read and write) on parameters, 0 on containers. VALUE is the current state; a parameter
  the state does not hold yet (a LoRA never set) shows its default, which is what the engine uses.

This module knows nothing of the daemon: it is given callables for the parameters and the state.
"""
from __future__ import annotations

import asyncio
import http
import json
import logging
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import osc, osc_codec
from .access import Access, RateLimit
from .web import CLOSE_TIMEOUT_S, QuietLogger, close_server, http_response, json_response, peer, refuse_foreign
from .params import Param

log = logging.getLogger(__name__)

# What this implementation supports, for HOST_INFO's EXTENSIONS (an unlisted or false one is unsupported).
EXTENSIONS: dict[str, bool] = {
    "ACCESS": True, "VALUE": True, "RANGE": True, "DESCRIPTION": True, "CLIPMODE": True,
    "LISTEN": True, "PATH_CHANGED": True,
    "TAGS": False, "EXTENDED_TYPE": False, "UNIT": False, "CRITICAL": False, "OVERLOADS": False,
    "HTML": False, "PATH_RENAMED": False, "PATH_ADDED": False, "PATH_REMOVED": False,
}
# Attributes a request may query (`/path?ATTRIBUTE`); HOST_INFO is answered apart.
QUERYABLE = ("FULL_PATH", "CONTENTS", "TYPE", "ACCESS", "VALUE", "RANGE", "DESCRIPTION", "CLIPMODE")
HOST_INFO = "HOST_INFO"

ACCESS_NONE, ACCESS_READ, ACCESS_READ_WRITE = 0, 1, 3
_TYPE_TAGS = {float: "f", int: "i", str: "s", bool: "T"}
_CONTAINER_DOCS = {
    "/lora": "Weights of LoRAs, one node per LoRA name; 0 turns one off.",
    "/controlnet": "ControlNets by index k, in the order of the controlnets setting.",
}
POLL_S = 0.02  # how often the state version is checked while WebSocket clients are connected
# Characters OSC 1.0 does not allow in an address part, besides "/" (which separates parts) and anything
# that is not printable ASCII.
_NOT_IN_ADDRESS = frozenset(" #*,?[]{}")


class OscQueryError(ValueError):
    """A WebSocket message from an OSCQuery client that this server does not understand."""


# ---------------------------------------------------------------------------- pure: the namespace
def tree(parameters: Sequence[Param], values: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The whole namespace as OSCQuery JSON (the root node, with every node in nested CONTENTS).

    `parameters` is what the daemon serves (`params.schema_params(...)`), `values` the current state
    (name -> value); `name` names the root, as HOST_INFO's NAME does.
    """
    root = _container("/", f"{name}: every sdbridge parameter, one OSC method each")
    parameters = listed(parameters)
    by_name = {p.name: p for p in parameters}
    for param in parameters:
        _insert(root, param.name, _method(param, values.get(param.name, param.default)))
    for address, members in _composites(by_name).items():
        _insert(root, address.strip("/"), _composite(address, members, values))
    return root


def listed(parameters: Sequence[Param]) -> tuple[Param, ...]:
    """The parameters the namespace lists: no list parameters, none with a name OSC does not allow in an
    address (see the module docstring)."""
    return tuple(p for p in parameters if p.kind is not tuple and _osc_address_ok(p.name))


def _osc_address_ok(name: str) -> bool:
    """Whether "/" + `name` is an address OSC 1.0 allows: parts of printable ASCII but _NOT_IN_ADDRESS."""
    return all(part and all(" " < c <= "~" and c not in _NOT_IN_ADDRESS for c in part) for part in name.split("/"))


def _composites(by_name: Mapping[str, Param]) -> dict[str, list[Param]]:
    """The composite addresses whose parameters are all listed, with those parameters."""
    return {address: [by_name[n] for n in names] for address, names in osc.COMPOSITE.items()
            if all(n in by_name for n in names)}


def _container(path: str, description: str | None = None) -> dict[str, Any]:
    node: dict[str, Any] = {"FULL_PATH": path, "ACCESS": ACCESS_NONE, "CONTENTS": {}}
    if description:
        node["DESCRIPTION"] = description
    return node


def _insert(root: dict[str, Any], name: str, node: dict[str, Any]) -> None:
    """Put a method node at /<name>, making the containers above it."""
    *parents, leaf = name.split("/")
    here, path = root, ""
    for part in parents:
        path += "/" + part
        contents = here.setdefault("CONTENTS", {})
        if part not in contents:
            contents[part] = _container(path, _container_doc(path))
        here = contents[part]
    here.setdefault("CONTENTS", {})[leaf] = node


def _container_doc(path: str) -> str | None:
    if path in _CONTAINER_DOCS:
        return _CONTAINER_DOCS[path]
    match = re.fullmatch(r"/controlnet/(\d+)", path)
    return f"ControlNet {match[1]}: its conditioning scale and the part of the schedule where it acts." if match else None


def _method(param: Param, value: Any) -> dict[str, Any]:
    """The node of one (scalar) parameter."""
    node: dict[str, Any] = {"FULL_PATH": "/" + param.name, "ACCESS": ACCESS_READ_WRITE,
                            "TYPE": _TYPE_TAGS[param.kind], "VALUE": [value], "DESCRIPTION": param.doc}
    _add_ranges(node, [_range(param.minimum, param.maximum, param.choices)])
    return node


def _composite(address: str, members: Sequence[Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """The node of an OSC address that sets several parameters at once (/resolution: width, height)."""
    node: dict[str, Any] = {"FULL_PATH": address, "ACCESS": ACCESS_READ_WRITE,
                            "TYPE": "".join(_TYPE_TAGS[p.kind] for p in members),
                            "VALUE": [values.get(p.name, p.default) for p in members],
                            "DESCRIPTION": f"Sets {' and '.join(p.name for p in members)} in one message. "
                                           + " ".join(p.doc for p in members)}
    _add_ranges(node, [_range(p.minimum, p.maximum, p.choices) for p in members])
    return node


def _range(low: float | None, high: float | None, choices: Sequence[str]) -> dict[str, Any] | None:
    if choices:
        return {"VALS": list(choices)}
    out = {}
    if low is not None:
        out["MIN"] = low
    if high is not None:
        out["MAX"] = high
    return out or None


def _add_ranges(node: dict[str, Any], ranges: list[dict[str, Any] | None]) -> None:
    if any(ranges):
        node["RANGE"] = ranges
    clip = ["both" if r and "MIN" in r and "MAX" in r else None for r in ranges]
    if any(clip):
        node["CLIPMODE"] = clip


def addresses(parameters: Sequence[Param]) -> frozenset[str]:
    """The OSC address of every method in the namespace: what a client may LISTEN to."""
    by_name = {p.name: p for p in listed(parameters)}
    return frozenset({"/" + name for name in by_name} | set(_composites(by_name)))


def arguments(parameters: Sequence[Param], values: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Every method's current value as OSC arguments, by OSC address: what a LISTEN client receives."""
    by_name = {p.name: p for p in listed(parameters)}
    out = {"/" + p.name: [values.get(p.name, p.default)] for p in by_name.values()}
    for address, members in _composites(by_name).items():
        out[address] = [values.get(p.name, p.default) for p in members]
    return out


def host_info(name: str, osc_ip: str, osc_port: int) -> dict[str, Any]:
    """HOST_INFO: the server's name, what it supports, and where its OSC server listens.

    An OSC server bound to every interface (0.0.0.0) leaves OSC_IP out: the proposal then has clients
    use the address they reached this server at, which is the one that works for them.
    """
    info: dict[str, Any] = {"NAME": name, "EXTENSIONS": dict(EXTENSIONS)}
    if osc_ip not in ("0.0.0.0", "", "::"):
        info["OSC_IP"] = osc_ip
    info.update(OSC_PORT=osc_port, OSC_TRANSPORT="UDP")
    return info


def respond(target: str, namespace: Mapping[str, Any], info: Mapping[str, Any]) -> tuple[int, Any]:
    """The answer to an HTTP GET of `target` (path and query of the URL): (status, JSON body or None).

    The proposal's rules: the path names a node, answered with its whole subtree; `?ATTRIBUTE` answers
    `{ATTRIBUTE: value}` alone, or `{}` where the attribute does not apply to that node; `?HOST_INFO`
    answers `info` whatever the path. 404: no node at the path. 400: an attribute that is unknown or
    not supported (the proposal's error list; its core section says 204 for the latter, but 204 means
    "no content" and is kept for its other use). 204: VALUE of a node whose ACCESS is not readable.
    """
    parts = urlsplit(target)
    query = unquote(parts.query).partition("=")[0]  # "?VALUE" and "?VALUE=" alike; no other forms
    if query == HOST_INFO:
        return 200, dict(info)
    if query and query not in QUERYABLE:
        return 400, None
    node = _find(namespace, unquote(parts.path))
    if node is None:
        return 404, None
    if not query:
        return 200, node
    if query == "VALUE" and not node.get("ACCESS", ACCESS_READ) & ACCESS_READ:
        return 204, None
    return 200, {query: node[query]} if query in node else {}


def _find(namespace: Mapping[str, Any], path: str) -> Mapping[str, Any] | None:
    node = namespace
    for part in filter(None, path.split("/")):
        node = node.get("CONTENTS", {}).get(part)
        if node is None:
            return None
    return node


def listen_command(message: str) -> tuple[str, str]:
    """("LISTEN" or "IGNORE", OSC address) from a client's WebSocket text message, or OscQueryError."""
    try:
        data = json.loads(message)
    except ValueError:
        raise OscQueryError(f"not JSON: {message[:80]!r}") from None
    if not isinstance(data, dict) or data.get("COMMAND") not in ("LISTEN", "IGNORE"):
        raise OscQueryError(f"expected {{\"COMMAND\": \"LISTEN\" or \"IGNORE\", \"DATA\": address}}, got {message[:80]!r}")
    address = data.get("DATA")
    if not isinstance(address, str) or not address.startswith("/"):
        raise OscQueryError(f"{data['COMMAND']} needs an OSC address in DATA, got {address!r}")
    return data["COMMAND"], address


def path_changed(path: str = "/") -> str:
    """The server's notice that the namespace under `path` changed and clients should fetch it again."""
    return json.dumps({"COMMAND": "PATH_CHANGED", "DATA": path})


# ---------------------------------------------------------------------------- I/O: HTTP + WebSocket
@dataclass(eq=False)
class _Client:
    """One WebSocket connection and what waits to be sent to it: the newest message of each address it
    listens to, and whether a PATH_CHANGED notice is due. Bounded whatever the client does: at most one
    message per address of the namespace."""

    connection: ServerConnection
    listening: set[str] = field(default_factory=set)
    pending: dict[str, bytes] = field(default_factory=dict)  # address -> newest OSC message not sent yet
    path_changed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sender: asyncio.Task | None = None

    def post(self, address: str, message: bytes) -> None:
        self.pending[address] = message  # replaces one not sent yet, keeping its turn
        self.wake.set()

    def post_path_changed(self) -> None:
        self.path_changed = True
        self.wake.set()


class OscQueryServer:
    """Serves the namespace over HTTP and streams LISTENed values over a WebSocket, on one port.

    `parameters()` returns the parameters served now and `values()` (state_version, values).
    `parameters()` may be slow (it may list the models folders), so it is called on a worker thread, per
    HTTP request and whenever the state changes while WebSocket clients are connected; `values()` is
    called on the asyncio thread, every POLL_S while WebSocket clients are connected, to spot changes.
    Binary OSC packets a client sends over the WebSocket go to `on_osc` (the daemon's OSC handling)
    when given, and are dropped otherwise.
    """

    def __init__(self, parameters: Callable[[], Sequence[Param]],
                 values: Callable[[], tuple[int, Mapping[str, Any]]], name: str, osc_ip: str, osc_port: int,
                 on_osc: Callable[[bytes, tuple[str, int]], None] | None = None, access: Access | None = None,
                 limits: RateLimit | None = None):
        self._parameters = parameters
        self._values = values
        self._name = name
        self._info = host_info(name, osc_ip, osc_port)
        self._on_osc = on_osc
        self._access = access or Access("127.0.0.1")
        self._limits = limits or RateLimit(0)
        self._server: Server | None = None
        self._clients: dict[ServerConnection, _Client] = {}
        self._addresses: frozenset[str] = frozenset()  # the namespace's addresses, as last looked at
        self._watch_task: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> None:
        """Bind and serve; port 0 picks a free port (see `port`). OSError names the port on failure."""
        try:
            self._server = await serve(self._session, host, port, process_request=self._http,
                                       logger=QuietLogger(log, {}), server_header="sdbridge",
                                       close_timeout=CLOSE_TIMEOUT_S)
        except OSError as e:
            raise OSError(e.errno, f"cannot serve OSCQuery on {host}:{port} ({e.strerror}); is another program or "
                                   "sdbridge instance using it? Choose another with --oscquery-port") from None
        log.debug("OSCQuery on http://%s:%d", host, self.port)

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop serving and close every WebSocket connection, within about CLOSE_TIMEOUT_S + 1.5 s whatever
        the clients do: one that stopped reading is cut off (web.close_server)."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None
        server, self._server = self._server, None
        if server is None:
            return
        await close_server(server, [client.connection for client in self._clients.values()])
        for client in self._clients.values():
            if client.sender is not None:
                client.sender.cancel()

    async def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer a plain HTTP request; let a WebSocket upgrade through (None). Both for this machine's
        clients only: 403 for a request that a page from another site could have made."""
        # Reads are refused too, not only the WebSocket (which takes OSC: a page that opened one could change
        # anything, /preset/save included). A cross-origin GET, which browsers send with an Origin, would let
        # a page on any website read the prompts. OSCQuery's clients are applications (VDMX, MadMapper,
        # Chataigne, ossia score) that send no Origin and pass; a browser-based client would have to come
        # from this origin, and this port serves no page. Hence no Access-Control-Allow-Origin either: no
        # cross-origin request gets an answer for it to allow.
        refused = refuse_foreign(request)
        if refused is not None:
            return refused
        # OSCQuery is OSC's discovery: it answers the machines that may send OSC (osc_allow), no others
        address = peer(connection)
        if not self._access.osc_allowed(address):
            if self._access.count_refusal(("oscquery", address)):
                log.warning("OSCQuery request from %s refused: not in osc_allow", address)
            return _response(http.HTTPStatus.FORBIDDEN, None)
        if not self._limits.allow(("http", address)):
            return _response(http.HTTPStatus.TOO_MANY_REQUESTS, None)
        if request.method == "GET" and "websocket" in request.headers.get("Upgrade", "").lower():
            return None
        if request.method != "GET":
            return _response(http.HTTPStatus.METHOD_NOT_ALLOWED, None, ("Allow", "GET"))
        _, values = self._values()
        return await asyncio.to_thread(self._answer, request.path, values)

    def _answer(self, target: str, values: Mapping[str, Any]) -> Response:
        """The answer to a GET of `target`; on a worker thread, since `parameters()` may be slow."""
        return _response(*respond(target, tree(self._parameters(), values, self._name), self._info))

    async def _session(self, connection: ServerConnection) -> None:
        """One WebSocket client: LISTEN/IGNORE commands as text, OSC packets as binary messages."""
        client = self._clients[connection] = _Client(connection)
        client.sender = asyncio.get_running_loop().create_task(self._send_forever(client))
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())
        try:
            async for message in connection:
                if isinstance(message, str):
                    if self._limits.allow(("oscquery", id(client))):  # commands beyond the rate: dropped
                        await self._command(client, message)
                elif self._on_osc is not None:
                    self._on_osc(bytes(message), connection.remote_address[:2])  # rate-limited as OSC from there
                else:
                    log.debug("OSCQuery client %s sent OSC over the WebSocket; dropped (send it to the OSC port)",
                              connection.remote_address)
        except ConnectionClosed:
            pass
        finally:
            del self._clients[connection]
            client.sender.cancel()

    async def _command(self, client: _Client, message: str) -> None:
        """LISTEN to a node of the namespace as it is now, or IGNORE one; anything else is ignored."""
        try:
            command, address = listen_command(message)
        except OscQueryError as e:
            log.debug("OSCQuery client %s: %s", client.connection.remote_address, e)
            return
        if command == "IGNORE":
            client.listening.discard(address)
            client.pending.pop(address, None)
            return
        if address not in self._addresses:  # or a node added since they were last looked at
            self._addresses = addresses(await asyncio.to_thread(self._parameters))
        if address not in self._addresses:
            log.debug("OSCQuery client %s: LISTEN %s ignored: no such node", client.connection.remote_address,
                      address[:80])
            return
        client.listening.add(address)

    @staticmethod
    async def _send_forever(client: _Client) -> None:
        """Send what waits for this client, PATH_CHANGED first; one message at a time, so a client that
        reads slowly or not at all holds up only itself, and what waits for it is replaced, not queued."""
        try:
            while True:
                await client.wake.wait()
                client.wake.clear()
                while client.path_changed or client.pending:
                    if client.path_changed:
                        client.path_changed = False
                        message: str | bytes = path_changed("/")
                    else:
                        address = next(iter(client.pending))
                        message = client.pending.pop(address)
                    await client.connection.send(message)
        except ConnectionClosed:
            pass

    async def _watch(self) -> None:
        """While clients are connected: on every state change, post each client the OSC messages of
        the nodes it listens to whose value changed, and PATH_CHANGED when the parameters did. It never
        waits on a client."""
        try:
            version, values = self._values()
            parameters, sent = await asyncio.to_thread(self._arguments, values)
            self._addresses = frozenset(sent)
            while self._clients:
                await asyncio.sleep(POLL_S)
                latest, values = self._values()
                if latest == version:
                    continue
                version = latest
                now_parameters, now = await asyncio.to_thread(self._arguments, values)
                if now_parameters != parameters:
                    parameters = now_parameters
                    self._addresses = frozenset(now)
                    for client in self._clients.values():
                        client.post_path_changed()
                changed = {address for address, args in now.items() if sent.get(address) != args}
                sent = now
                messages: dict[str, bytes] = {}
                for client in self._clients.values():
                    for address in changed & client.listening:
                        if address not in messages:
                            messages[address] = osc_codec.message(address, *now[address])
                        client.post(address, messages[address])
        except Exception:  # a bug here must not take the server down; LISTEN resumes with the next client
            log.exception("OSCQuery: watching the state failed; LISTEN stops until a client reconnects")

    def _arguments(self, values: Mapping[str, Any]) -> tuple[tuple[Param, ...], dict[str, list[Any]]]:
        """(the parameters now, every node's arguments); on a worker thread, since `parameters()` may be slow."""
        parameters = tuple(self._parameters())
        return parameters, arguments(parameters, values)


def _response(status: int, body: Any, *fields: tuple[str, str]) -> Response:
    """An HTTP response carrying `body` as JSON (none for None)."""
    return http_response(status, b"", None, *fields) if body is None else json_response(body, status, *fields)


# ---------------------------------------------------------------------------- I/O: mDNS
OSCJSON_TYPE = "_oscjson._tcp.local."
OSC_TYPE = "_osc._udp.local."


class Advertiser:
    """Advertises the OSCQuery server (`_oscjson._tcp`) and the OSC port (`_osc._udp`) over mDNS.

    Built on `zeroconf` rather than python-oscquery, which binds every interface, leaves out RANGE and
    DESCRIPTION and runs its own threaded HTTP server. The records go where the servers listen: the
    loopback interface only for host 127.0.0.1, every interface with its IPv4 addresses for 0.0.0.0,
    and the one address otherwise. Registering probes the network for about two seconds, so `start`
    does it on a daemon thread and returns at once; mDNS is a convenience, so no failure of it raises
    (a warning is logged). `close` withdraws the records and is safe whatever state `start` reached.
    """

    def __init__(self, instance: str, host: str, oscquery_port: int, osc_port: int):
        self.instance = instance
        self.host = host
        self.services = ((OSCJSON_TYPE, oscquery_port), (OSC_TYPE, osc_port))
        self._lock = threading.Lock()
        self._closing = False
        self._zeroconf: Any = None
        self._thread: threading.Thread | None = None
        self.registered: list[str] = []  # full service names, once each registration completes

    def start(self) -> None:
        self._thread = threading.Thread(target=self._register, name="sdbridge-mdns", daemon=True)
        self._thread.start()

    def _register(self) -> None:
        try:
            from zeroconf import IPVersion, ServiceInfo, Zeroconf
            interfaces, addresses = self._where()
            zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        except Exception as e:  # no zeroconf package, no multicast, an unusable host
            log.warning("mDNS advertising off: %s", e)
            return
        with self._lock:
            if self._closing:
                zc.close()
                return
            self._zeroconf = zc
        server = _dns_label(f"{socket.gethostname().split('.')[0]}-sdbridge-{self.instance}") + ".local."
        for type_, port in self.services:
            info = ServiceInfo(type_, f"{_dns_label('sdbridge-' + self.instance)}.{type_}", port=port,
                               parsed_addresses=addresses, server=server)
            try:
                if self._closing:
                    return
                zc.register_service(info, allow_name_change=True)
            except Exception as e:
                if not self._closing:
                    log.warning("mDNS: could not advertise %s: %s", type_, e)
                return
            self.registered.append(info.name)
            log.info("mDNS: advertised %s on port %d (%s)", info.name, port, ", ".join(addresses))

    def _where(self) -> tuple[Any, list[str]]:
        """(zeroconf interfaces, advertised IPv4 addresses) for the servers' bind address."""
        from zeroconf import InterfaceChoice
        addresses = reachable_addresses(self.host)
        if self.host in ("0.0.0.0", ""):
            return InterfaceChoice.All, addresses
        try:
            socket.inet_aton(self.host)
        except OSError:
            raise ValueError(f"mDNS here advertises IPv4 addresses; host {self.host!r} is not one") from None
        return addresses, addresses

    def close(self, timeout: float = 2.0) -> None:
        """Withdraw the records (goodbye packets) and close, within about `timeout` seconds."""
        with self._lock:
            self._closing = True
            zc, self._zeroconf = self._zeroconf, None
        if self._thread is not None:
            self._thread.join(timeout / 2)  # a registration under way finishes, then is withdrawn cleanly
        if zc is None:
            return
        closer = threading.Thread(target=self._close, args=(zc,), name="sdbridge-mdns-close", daemon=True)
        closer.start()
        closer.join(timeout / 2)
        if closer.is_alive():
            log.warning("mDNS: withdrawing the records is taking long; leaving it to finish in the background")

    @staticmethod
    def _close(zc: Any) -> None:
        try:
            zc.close()  # unregisters every registered service first
        except Exception as e:
            log.debug("mDNS close: %s", e)


def reachable_addresses(host: str) -> list[str]:
    """The IPv4 addresses other machines reach servers bound to `host` at: every interface's but
    loopback for 0.0.0.0 (127.0.0.1 where there is none), else `host` itself."""
    if host not in ("0.0.0.0", ""):
        return [host]
    import ifaddr  # zeroconf's own dependency for listing interfaces

    found = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
             if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]
    return found or ["127.0.0.1"]


def _dns_label(text: str) -> str:
    """`text` as one DNS label: letters, digits and hyphens, at most 63 characters."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", text)[:63].strip("-") or "sdbridge"

