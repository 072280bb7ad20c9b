"""Who may reach the app and what they may name: plain names inside their folders, the API closed to all but ours,
loopback Host headers, same-origin browsers and a slow-down after failed logins (issue #14).

The checks are plain functions; `Guard` is the ASGI middleware that applies the request checks in front of Gradio.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

API_ROUTES = ("create_run", "status", "cancel", "resume", "list_runs", "files",  # ui/api.py, the documented API
              "compare_start", "compare_status", "compare_cancel", "sweep_start", "sweep_status", "sweep_cancel")
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})
NAMED_CALL = re.compile(r"^/gradio_api/(?:call/v2|call|run|api)/([^/]+)")
MAX_NAME = 255


# --- names ---

def plain_name(value, what: str) -> str:
    """`value` if it is one file name (no folder, no "..", not hidden, no control character); else ValueError."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what}: give a name (got {value!r})")
    if ("/" in value or "\\" in value or value.startswith(".") or len(value) > MAX_NAME
            or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        raise ValueError(f"{what} {value[:80]!r}: must be a plain name, not a path (no / \\ or leading .)")
    return value


def inside(folder: Path, name, what: str) -> Path:
    """folder/name, refused unless `name` is a plain name and, links followed, it still lies right in `folder`."""
    path = Path(folder) / plain_name(name, what)
    if path.resolve().parent != Path(folder).resolve():
        raise ValueError(f"{what} {name!r}: leads outside {folder}")
    return path


# --- the API ---

def close_api(demo, keep: Iterable[str] = API_ROUTES) -> list[str]:
    """Every event of the built Blocks becomes private (off /gradio_api/info, refused by gradio_client) except the
    `gr.api` routes named in `keep`; the page still calls its handlers by number. Returns the names closed.
    Gradio does not refuse a raw HTTP call to a private route by name: `Guard` does."""
    keep, closed = set(keep), []
    ours = {fn.api_name for fn in demo.fns.values() if fn.api_name in keep and not fn.targets}
    if missing := keep - ours:
        raise ValueError(f"close_api: no API route named {', '.join(sorted(missing))}")
    for fn in demo.fns.values():
        if fn.api_name in ours and not fn.targets:
            continue
        if fn.api_visibility != "private":
            closed.append(str(fn.api_name))
        fn.api_visibility = "private"
    demo.config = demo.get_config_file()  # the page's copy of the events says so too
    return closed


# --- hosts and origins ---

def host_of(value: str) -> str:
    """"Example.org:7860" -> "example.org", "[::1]:7860" -> "::1"; "" when it is not a host."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else ""
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The names a request's Host header may carry: loopback, the --host the app listens on and `extra`. Listening
    on every address (0.0.0.0), also this machine's name and the addresses it resolves to."""
    names = set(LOOPBACK) | {host_of(h) for h in extra if h.strip()}
    if host in WILDCARDS:
        names |= {host_of(n) for n in machine_names()}
    else:
        names.add(host_of(host))
    return frozenset(names)


def machine_names() -> set[str]:
    """This machine's names, the addresses they resolve to and the address it reaches other networks from."""
    names = {socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(name, None)}
        except OSError:
            pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 9))  # UDP: picks the outgoing interface, sends nothing
            names.add(s.getsockname()[0])
    except OSError:
        pass
    return names


def host_refusal(host_header: str | None, hosts: frozenset[str], suffixes: tuple[str, ...] = ()) -> str | None:
    """Why a Host header is refused (DNS rebinding: an attacker's name pointing at 127.0.0.1), or None."""
    name = host_of(host_header or "")
    if name in hosts or (suffixes and name.endswith(suffixes)):
        return None
    return f"Host {host_header!r} is not this app's address; start it with --allowed-hosts {name or 'NAME'} to allow it"


def origin_refusal(origin: str | None, host_header: str | None) -> str | None:
    """Why an Origin header is refused: only the app's own page (same host and port as the request) may drive it."""
    if origin is None:
        return None
    if urlsplit(origin).netloc.lower() == (host_header or "").strip().lower() != "":
        return None
    return f"Origin {origin!r} is not this app ({host_header}): requests from other pages are refused"


# --- logins ---

class LoginThrottle:
    """Per client: `free` failed logins within `window_s`, then each one more locks it out for twice as long
    (base_s, 2*base_s, ... up to max_s). A good login clears its record."""

    def __init__(self, free: int = 5, window_s: float = 600.0, base_s: float = 1.0, max_s: float = 300.0):
        self.free, self.window_s, self.base_s, self.max_s = free, window_s, base_s, max_s
        self.failures: dict[str, list[float]] = {}

    def wait_s(self, client: str, now: float | None = None) -> float:
        """Seconds before `client` may try again (0: now)."""
        now = time.monotonic() if now is None else now
        recent = [t for t in self.failures.get(client, []) if now - t < self.window_s]
        self.failures[client] = recent
        if len(recent) < self.free:
            return 0.0
        lock = min(self.max_s, self.base_s * 2 ** (len(recent) - self.free))
        return max(0.0, recent[-1] + lock - now)

    def record(self, client: str, ok: bool, now: float | None = None) -> None:
        if ok:
            self.failures.pop(client, None)
        else:
            self.failures.setdefault(client, []).append(time.monotonic() if now is None else now)
        if len(self.failures) > 10_000:  # many clients: forget the oldest record rather than grow without end
            self.failures.pop(next(iter(self.failures)))


# --- the middleware ---

class Guard:
    """ASGI middleware in front of Gradio: refuses foreign Host headers and Origins, named calls to routes that
    are not the API's, and logins from a client that failed too often."""

    def __init__(self, app, hosts: frozenset[str], api_names: Iterable[str] = API_ROUTES,
                 host_suffixes: tuple[str, ...] = (), throttle: LoginThrottle | None = None):
        self.app, self.hosts, self.api_names = app, hosts, frozenset(api_names)
        self.host_suffixes, self.throttle = tuple(host_suffixes), throttle or LoginThrottle()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope.get("path", "")
        named = NAMED_CALL.match(path)
        refusal = (host_refusal(headers.get("host"), self.hosts, self.host_suffixes)
                   or origin_refusal(headers.get("origin"), headers.get("host")))
        if refusal:
            return await refuse(scope, send, 403, refusal)
        if named and named.group(1) not in self.api_names:
            return await refuse(scope, send, 404, f"/{named.group(1)} is not part of the API; see /?view=api")
        if scope["type"] == "http" and scope["method"] == "POST" and path.rstrip("/") == "/login":
            return await self.login(scope, receive, send)
        return await self.app(scope, receive, send)

    async def login(self, scope, receive, send):
        client = (scope.get("client") or ("?", 0))[0]
        if (wait := self.throttle.wait_s(client)) > 0:
            return await refuse(scope, send, 429, f"too many failed logins: try again in {wait:.0f} s",
                                [(b"retry-after", str(max(1, round(wait))).encode())])
        status = []

        async def watch(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        if status:
            self.throttle.record(client, ok=status[0] < 400)


async def refuse(scope, send, code: int, message: str, headers: list | None = None) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    body = message.encode()
    await send({"type": "http.response.start", "status": code, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
