"""Who may play the daemon, and how fast: the token, the OSC allow-list and the per-client rate limit.

Every listener binds to `host` (127.0.0.1 by default: this machine only). A daemon bound elsewhere is
*exposed*, and then a client on another machine must prove itself: with the token over HTTP and the
WebSocket (`?token=`, `Authorization: Bearer`, or the cookie the page gets), and by its address for OSC
(`osc_allow`), since OSC has no way to carry a secret. This machine's own clients (TouchDesigner, the
TD component, scripts) never need either: whoever runs here can read the frames in shared memory anyway.

Pure decisions, no sockets: the servers ask `Access` and answer in their own protocol.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterable

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16  # characters; a token a phone's camera or a person types once, guessed by nobody
MAX_RATE_KEYS = 1024   # clients tracked by the rate limit at once; the idlest are forgotten first
REPORT_INTERVAL_S = 1.0  # a client over its rate is reported at most this often, with what was dropped


class AccessError(ValueError):
    """A setting that would leave the daemon open or unusable; the message says what to change."""


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a peer's address string names (an IPv4-mapped IPv6 one as IPv4; a zone dropped);
    None for anything that is not an IP address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(address: str) -> bool:
    """True for this machine's own addresses (127.0.0.0/8, ::1, and IPv4-mapped forms of them)."""
    ip = _ip(address)
    return address == "localhost" if ip is None else ip.is_loopback


def parse_networks(entries: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`osc_allow` entries (addresses or networks: 192.168.1.20, 192.168.1.0/24, fe80::/10) as networks."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise AccessError(f"osc_allow entry {entry!r}: expected an IP address or a network such as "
                              "192.168.1.0/24") from None
    return tuple(networks)


def kept_token(path: Path) -> str:
    """The token kept in `path`, made there on first use, so that the link a phone bookmarked keeps
    working after a restart. Readable by this user only."""
    try:
        token = path.read_text(encoding="utf-8").strip()
        if len(token) >= MIN_TOKEN_LENGTH:
            return token
    except OSError:
        pass
    token = secrets.token_urlsafe(18)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token


class Access:
    """The daemon's access rules, from its settings: `host` (where it listens), `token` (for HTTP and
    WebSocket clients on other machines), `osc_allow` (other machines that may send OSC)."""

    def __init__(self, host: str, token: str = "", osc_allow: Iterable[str] = ()):
        self.exposed = not is_loopback(host)
        self.networks = parse_networks(osc_allow)
        if token and len(token) < MIN_TOKEN_LENGTH:
            raise AccessError(f"token: at least {MIN_TOKEN_LENGTH} characters (or leave it empty for one made "
                              "and kept for you)")
        self.token = token
        self.refused = 0  # messages and requests refused for want of the token or the allow-list
        self._reported: OrderedDict[Hashable, float] = OrderedDict()  # client -> when last reported

    def osc_allowed(self, address: str) -> bool:
        """May OSC (or an OSCQuery client) from `address` play the daemon?"""
        if is_loopback(address):
            return True
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self.networks)

    def needs_token(self, address: str) -> bool:
        """Must an HTTP or WebSocket client at `address` show the token?"""
        return self.exposed and not is_loopback(address)

    def token_matches(self, candidate: str | None) -> bool:
        """True for the right token (compared in constant time)."""
        return bool(self.token) and candidate is not None and hmac.compare_digest(
            candidate.encode("utf-8", "replace"), self.token.encode("utf-8"))


    def count_refusal(self, client: Hashable) -> bool:
        """Count one refusal of `client`; True when it is to be reported: its first, then at most one
        every REPORT_INTERVAL_S (a stranger's flood makes one log line a second, not one a packet)."""
        self.refused += 1
        now = time.monotonic()
        last = self._reported.pop(client, None)
        due = last is None or now - last >= REPORT_INTERVAL_S
        self._reported[client] = now if due else last
        while len(self._reported) > MAX_RATE_KEYS:
            self._reported.popitem(last=False)
        return due


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    dropped: int = 0         # since the last report
    reported: float = -1e18  # when the last report was made


class RateLimit:
    """At most `rate` messages a second per client, after a burst of `burst` (default: one second's
    worth); token buckets kept for the MAX_RATE_KEYS most recently heard clients. `rate` 0: no limit."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        self.clock = clock
        self.dropped = 0  # over every client, since start
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def allow(self, client: Hashable) -> bool:
        """Count one message from `client`; False when it is over its rate and the message is to be dropped."""
        if self.rate <= 0:
            return True
        now = self.clock()
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
            while len(self._buckets) >= MAX_RATE_KEYS:
                self._buckets.popitem(last=False)
        self._buckets[client] = bucket  # the most recently heard last
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        bucket.dropped += 1
        self.dropped += 1
        return False

    def report_due(self, client: Hashable) -> int:
        """After a drop: how many of `client`'s messages were dropped since its last report, once every
        REPORT_INTERVAL_S (0 in between), so that a flood makes one line a second, not one a message."""
        bucket = self._buckets.get(client)
        if bucket is None or not bucket.dropped:
            return 0
        now = self.clock()
        if now - bucket.reported < REPORT_INTERVAL_S:
            return 0
        dropped, bucket.dropped, bucket.reported = bucket.dropped, 0, now
        return dropped
