"""A local S3-protocol server (moto) on the loopback address, which counts the requests it serves.

Started and stopped by the tests (``s3_server`` fixture in test_object_storage.py) and by the
benchmark; ``python tests/s3_server.py`` runs one in its own process and prints its address.
``GET /__requests__`` answers the requests served so far as JSON (and clears them with
``?clear=1``), so a process that did not start the server can read them too.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

REQUESTS_PATH = "/__requests__"


class Request(NamedTuple):
    method: str
    path: str  # /bucket/key
    range: Optional[str]  # the Range header of a GET, as sent
    bytes_out: int  # body bytes the server sent
    bytes_in: int  # body bytes it received (the request's Content-Length)


class _Counting:
    """WSGI middleware: records every request, and answers REQUESTS_PATH itself."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.requests: List[Request] = []
        self.kill: Optional[Tuple[int, int]] = None  # (pid, n): kill pid on receiving the n-th request

    def arm(self, pid: Optional[int], n: int) -> None:
        with self.lock:
            self.kill = None if pid is None else (pid, n)
            self.served = 0

    def _killed(self) -> bool:
        with self.lock:
            if self.kill is None:
                return False
            self.served += 1
            pid, n = self.kill
            if self.served != n:
                return False
        os.kill(pid, signal.SIGKILL)  # before this request reaches the store: it never takes effect
        return True

    def take(self, clear: bool) -> List[Request]:
        with self.lock:
            taken = list(self.requests)
            if clear:
                self.requests.clear()
            return taken

    def __call__(self, environ: Dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == REQUESTS_PATH:
            body = json.dumps(self.take("clear=1" in environ.get("QUERY_STRING", ""))).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            yield body
            return
        if self._killed():
            start_response("503 Service Unavailable", [("Content-Length", "0")])
            return
        if environ["REQUEST_METHOD"] == "POST" and "uploadId=" in environ.get("QUERY_STRING", ""):
            chunks = self._with_etag_header(environ, start_response)
        else:
            chunks = self.app(environ, start_response)
        sent = 0
        for chunk in chunks:
            sent += len(chunk)
            yield chunk
        with self.lock:
            received = int(environ.get("CONTENT_LENGTH") or 0)
            self.requests.append(Request(environ["REQUEST_METHOD"], path, environ.get("HTTP_RANGE"), sent, received))

    def _with_etag_header(self, environ: Dict[str, Any], start_response: Any) -> List[bytes]:
        """CompleteMultipartUpload's answer with its ETag as a header too: moto 5 sends it only in the
        XML body, and s3torchconnector's client reads the header."""
        answer: List[Any] = []
        body = b"".join(self.app(environ, lambda status, headers, *exc: answer.extend([status, list(headers)])))
        status, headers = answer
        match = re.search(rb"<ETag>(.*?)</ETag>", body)
        if match and not any(name.lower() == "etag" for name, _ in headers):
            headers.append(("ETag", match.group(1).decode().replace("&#34;", '"').replace("&quot;", '"')))
        start_response(status, headers)
        return [body]


class S3Server:
    """moto's S3 on 127.0.0.1, an OS-chosen port, in a thread of this process."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        self.counting = _Counting(DomainDispatcherApplication(create_backend_app))
        self.server = make_server("127.0.0.1", 0, self.counting, threaded=True, request_handler=Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="s3-server", daemon=True)
        self.thread.start()

    def requests(self, clear: bool = True) -> List[Request]:
        return self.counting.take(clear)

    def kill_at(self, pid: Optional[int], n: int) -> None:
        """SIGKILL process ``pid`` when the n-th request from now arrives, before the store sees it."""
        self.counting.arm(pid, n)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


if __name__ == "__main__":
    server = S3Server()
    print(server.url, flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        server.stop()
