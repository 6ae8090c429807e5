"""Local HTTP servers on 127.0.0.1 that record what they receive (notification tests)."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Tuple


class Recorder:
    """An HTTP server in a thread (port 0) recording requests; ``mode``: ok | 500 | hang.

    ``hang`` holds each request until ``release()`` (or 60 s). ``get`` answers GET requests:
    a callable (path, query) -> (status, body bytes).
    """

    def __init__(self, mode: str = "ok",
                 get: Optional[Callable[[str, Dict[str, List[str]]], Tuple[int, bytes]]] = None) -> None:
        self.mode = mode
        self.get = get
        self.posts: List[Tuple[str, Any]] = []
        self.gets: List[str] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = {"raw": raw.decode("utf-8", "replace"), "title": self.headers.get("Title")}
                with recorder.lock:
                    recorder.posts.append((self.path, body))
                if recorder.mode == "hang":
                    recorder.released.wait(60)
                code = 500 if recorder.mode == "500" else 200
                self.send_response(code)
                payload = b'{"ok":true}'
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                with recorder.lock:
                    recorder.gets.append(self.path)
                code, payload = (recorder.get(parts.path, urllib.parse.parse_qs(parts.query))
                                 if recorder.get else (404, b""))
                self.send_response(code)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def titles(self) -> List[str]:
        with self.lock:
            return [body.get("title") for _, body in self.posts]

    def wait_posts(self, count: int, timeout_s: float = 60.0) -> List[Tuple[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.posts) >= count:
                    return list(self.posts)
            time.sleep(0.02)
        with self.lock:
            return list(self.posts)

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
