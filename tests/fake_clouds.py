"""Fake cloud metadata services on 127.0.0.1 (``from fake_clouds import FakeAws, ...``; tests/ is on the path).

Each is a stdlib ``ThreadingHTTPServer`` on a free port, serving "no notice" until the moment the test
chose (``notice_after`` seconds after it started, or :meth:`FakeCloud.trigger`), then the notice. Each
checks what the real one checks: AWS the IMDSv2 token (401 without it), GCP the ``Metadata-Flavor: Google``
header (403), Azure the ``Metadata: true`` header (400). Every request is recorded (``requests``, header
names in lower case), Azure's acknowledgements separately (``acks``). ``override`` maps a path to a fixed
(status, body) answer, for malformed responses. Use as a context manager: the server thread is joined on exit.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def iso(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeCloud:
    """The shared server; subclasses answer in :meth:`answer`."""

    def __init__(self, notice_after: float | None = None) -> None:
        self.started = time.monotonic()
        self.notice_after = notice_after
        self._noticed_at: float | None = None  # wall time the notice first showed, fixed once seen
        self.requests: list[tuple[float, str, str, dict[str, str]]] = []  # (wall time, method, path, headers)
        self.acks: list[tuple[float, Any]] = []
        self.override: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, text = cloud.handle(self.command, self.path, dict(self.headers.items()), body)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-{type(self).__name__}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def trigger(self) -> None:
        self.notice_after = min(self.notice_after or 0.0, time.monotonic() - self.started)

    def noticed(self) -> float | None:
        """The wall time the notice was first served (its deadline counts from then), or None if not yet due."""
        if self.notice_after is None or time.monotonic() - self.started < self.notice_after:
            return None
        with self._lock:
            if self._noticed_at is None:
                self._noticed_at = time.time()
            return self._noticed_at

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        headers = {k.lower(): v for k, v in headers.items()}  # header names are case-insensitive
        with self._lock:
            self.requests.append((time.time(), method, path, headers))
        if path in self.override:
            return self.override[path]
        return self.answer(method, path, headers, body)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeCloud:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeAws(FakeCloud):
    """IMDSv2: PUT /latest/api/token (needs the TTL header), then GETs with the token; 2 minutes' notice."""

    LEAD = 120.0

    def __init__(self, notice_after: float | None = None, *, rebalance_after: float | None = None) -> None:
        super().__init__(notice_after)
        self.rebalance_after = rebalance_after
        self.tokens: set[str] = set()

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        if path == "/latest/api/token":
            if method != "PUT" or "x-aws-ec2-metadata-token-ttl-seconds" not in headers:
                return 400, "Bad Request"
            token = f"token-{len(self.tokens)}"
            self.tokens.add(token)
            return 200, token
        if headers.get("x-aws-ec2-metadata-token") not in self.tokens:
            return 401, "Unauthorized"
        if path == "/latest/meta-data/spot/instance-action":
            when = self.noticed()
            if when is None:
                return 404, "Not Found"
            return 200, json.dumps({"action": "terminate", "time": iso(when + self.LEAD)})
        if path == "/latest/meta-data/events/recommendations/rebalance":
            if self.rebalance_after is None or time.monotonic() - self.started < self.rebalance_after:
                return 404, "Not Found"
            return 200, json.dumps({"noticeTime": iso(time.time())})
        return 404, "Not Found"


class FakeGcp(FakeCloud):
    """instance/preempted (FALSE, then TRUE) or, with ``maintenance``, instance/maintenance-event."""

    def __init__(self, notice_after: float | None = None, *, maintenance: bool = False) -> None:
        super().__init__(notice_after)
        self.maintenance = maintenance

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        if headers.get("metadata-flavor") != "Google":
            return 403, "Missing Metadata-Flavor:Google header."
        due = self.noticed() is not None
        route = path.split("?")[0]
        if route == "/computeMetadata/v1/instance/preempted":
            return 200, "TRUE" if due and not self.maintenance else "FALSE"
        if route == "/computeMetadata/v1/instance/maintenance-event":
            return 200, "TERMINATE_ON_HOST_MAINTENANCE" if due and self.maintenance else "NONE"
        return 404, "Not Found"


class FakeAzure(FakeCloud):
    """Scheduled Events: no events, then one Preempt event (NotBefore 30 s after it appeared); POST = ack."""

    EVENT_ID = "602d9444-d2cd-49c7-8624-8643e7171297"
    LEAD = 30.0

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        if headers.get("metadata") != "true":
            return 400, json.dumps({"error": "Bad request. Required metadata header not specified"})
        if path != "/metadata/scheduledevents?api-version=2020-07-01":
            return 404, "Not Found"
        if method == "POST":
            try:
                doc = json.loads(body)
            except ValueError:
                return 400, "Bad request"
            with self._lock:
                self.acks.append((time.time(), doc))
            return 200, ""
        when = self.noticed()
        events = [] if when is None else [{
            "EventId": self.EVENT_ID, "EventStatus": "Scheduled", "EventType": "Preempt", "ResourceType":
            "VirtualMachine", "Resources": ["vm0"], "NotBefore": format_datetime(
                datetime.fromtimestamp(when + self.LEAD, timezone.utc), usegmt=True),
            "Description": "", "EventSource": "Platform", "DurationInSeconds": -1}]
        return 200, json.dumps({"DocumentIncarnation": 1 if events else 0, "Events": events})
