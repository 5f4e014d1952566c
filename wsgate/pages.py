"""Files answering plain GETs on a listener: a route's `static` directory (the demo's chat page).

A WebSocket-only endpoint answers a request without `Upgrade: websocket` with
426; a route with `static: DIR` answers a GET with the file under DIR that the
path names below the route's prefix (`index.html` for a directory), so a page
and the WebSocket it opens can share one address. Only regular files inside DIR
are served, whatever the path says.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

from .handshake import render_error, render_response

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
INDEX = "index.html"


def static_file(directory: str | Path, relative: str) -> Path | None:
    """The regular file under `directory` that `relative` (a URL path, %-encoded) names, or None.

    A hidden name, a backslash or a NUL anywhere names nothing, and neither does a
    path that resolves (through `..` or a link) outside `directory`.
    """
    name = unquote(relative).lstrip("/")
    if "\\" in name or "\x00" in name or any(part.startswith(".") for part in name.split("/")):
        return None
    root = Path(directory).resolve()
    candidate = (root / name).resolve()
    if candidate.is_dir():
        candidate = candidate / INDEX
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate


def static_reply(directory: str | Path, relative: str) -> tuple[int, bytes]:
    """(status, the whole HTTP reply) for a GET of `relative` under `directory`."""
    path = static_file(directory, relative)
    if path is None:
        return 404, render_error(404, "no such file")
    body = path.read_bytes()
    headers = [
        (b"Content-Type", CONTENT_TYPES.get(path.suffix, "application/octet-stream").encode("ascii")),
        (b"Content-Length", str(len(body)).encode("ascii")),
        # The files change with wsgate's version; a reloaded page must not mix two.
        (b"Cache-Control", b"no-cache"),
        (b"X-Content-Type-Options", b"nosniff"),
        (b"Connection", b"close"),
    ]
    return 200, render_response(200, headers, body)


def below_prefix(path: str, prefix: str) -> str:
    """`path` without the route's prefix: `/chat/app.js` under `/chat` is `/app.js`."""
    return path[len(prefix.rstrip("/")) :] if path.startswith(prefix.rstrip("/")) else path
