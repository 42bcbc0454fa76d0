"""A real S3-compatible server on 127.0.0.1 (moto's, in threads of the test process) and a fault-injecting HTTP
proxy in front of it: the remote tier's tests talk to both through the standard AWS client chain
(``AWS_ENDPOINT_URL``), never to a mocked client.
"""
from __future__ import annotations

import http.client
import http.server
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ftrain-test", "AWS_SECRET_ACCESS_KEY": "ftrain-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
# Neither the credential chain nor the endpoint may reach outside: no IMDS, no profile files.
ISOLATION = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
             "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@dataclass
class S3Server:
    url: str
    proxy: FaultProxy

    def env(self, *, through_proxy: bool = True) -> dict[str, str]:
        """Environment for clients (this process or workers) to use this server."""
        return {**CREDENTIALS, **ISOLATION, "AWS_ENDPOINT_URL": self.proxy.url if through_proxy else self.url}

    def make_bucket(self, name: str | None = None) -> str:
        import boto3

        name = name or f"ftrain-{random.randrange(16**8):08x}"
        client = boto3.session.Session(aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                       aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                       region_name="us-east-1").client("s3", endpoint_url=self.url)
        client.create_bucket(Bucket=name)
        return name


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, with a :class:`FaultProxy` in front."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = FaultProxy("127.0.0.1", port)
    try:
        yield S3Server(f"http://{host}:{port}", proxy)
    finally:
        proxy.close()
        server.stop()


@dataclass
class Faults:
    """What the proxy does to the next requests: ``errors`` answered with ``status`` (5xx) without forwarding,
    ``drops`` cut off half-way through the request body (the connection closed, nothing answered)."""

    errors: int = 0
    status: int = 503
    drops: int = 0
    only_methods: tuple[str, ...] = ("PUT", "POST")
    seen: list[str] = field(default_factory=list)


class FaultProxy:
    """An HTTP proxy on a free loopback port that forwards to ``host:port`` and injects :class:`Faults`."""

    def __init__(self, host: str, port: int) -> None:
        self.faults = Faults()
        self._lock = threading.Lock()
        target = (host, port)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _take(self) -> str | None:
                with proxy._lock:
                    f = proxy.faults
                    f.seen.append(f"{self.command} {self.path}")
                    if self.command not in f.only_methods:
                        return None
                    if f.drops > 0:
                        f.drops -= 1
                        return "drop"
                    if f.errors > 0:
                        f.errors -= 1
                        return "error"
                return None

            def _body(self) -> bytes:
                """The request body as sent: by Content-Length, or the raw chunked stream (framing, trailers)."""
                if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                    length = int(self.headers.get("Content-Length") or 0)
                    return self.rfile.read(length) if length else b""
                raw = bytearray()
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers, then the empty line
                            t = self.rfile.readline()
                            raw += t
                            if t in (b"\r\n", b"\n", b""):
                                return bytes(raw)
                    raw += self.rfile.read(size + 2)

            def _forward(self) -> None:
                fault = self._take()
                if fault == "drop":
                    length = int(self.headers.get("Content-Length") or 0)
                    self.rfile.read(length // 2 if length else 1024)
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                body = self._body()
                if fault == "error":
                    msg = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                    self.send_response(proxy.faults.status)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(*target, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        # HEAD: the server's Content-Length is the object's size, not this (empty) body's
                        if k.lower() not in ("transfer-encoding", "connection") and (
                                k.lower() != "content-length" or self.command == "HEAD"):
                            self.send_header(k, v)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def inject(self, **kw: object) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.faults, k, v)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
