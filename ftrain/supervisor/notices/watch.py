"""Preemption notices, the watching part: the HTTP transport, one source per cloud and the drain file, and
the watcher threads (see the package docstring for the thread-safety contract)."""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ftrain.supervisor.notices.parse import (
    Notice,
    Parsed,
    Problem,
    Response,
    _bad_status,
    parse_aws_action,
    parse_aws_rebalance,
    parse_azure_events,
    parse_gcp_maintenance,
    parse_gcp_preempted,
)

log = logging.getLogger("ftrain.launch")

#: The sources ``supervisor.notices.sources`` may name.
SOURCES = ("aws", "gcp", "azure", "drain")
#: IMDSv2 session token lifetime we ask for (the maximum AWS allows), and when we renew it.
AWS_TOKEN_TTL, AWS_TOKEN_RENEW = 21600, 21000
#: Backoff while a source answers with problems: interval * 2**failures, at most this many seconds.
BACKOFF_CAP = 30.0
#: Timeout of one metadata request; the metadata services answer in milliseconds.
REQUEST_TIMEOUT = 2.0
#: The most of a response body read (a metadata answer is a few hundred bytes).
MAX_BODY = 1 << 16
AZURE_API = "api-version=2020-07-01"


#: (method, url, headers, body, timeout) -> Response. Never raises.
Transport = Callable[[str, str, Mapping[str, str], "bytes | None", float], Response]

# No proxy, ever: a metadata service is link-local, and a proxy from the environment would answer for it.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, headers: Mapping[str, str], data: bytes | None = None,
         timeout: float = REQUEST_TIMEOUT) -> Response:
    """One request with the stdlib; every failure becomes a :class:`Response` (errors are data)."""
    req = urllib.request.Request(url, data=data, headers=dict(headers), method=method)
    try:
        with _OPENER.open(req, timeout=timeout) as answer:
            return Response(answer.status, answer.read(MAX_BODY).decode("utf-8", "replace"))
    except urllib.error.HTTPError as e:
        try:
            body = e.read(MAX_BODY).decode("utf-8", "replace")
        except OSError:
            body = ""
        return Response(e.code, body)
    except (urllib.error.URLError, OSError, ValueError) as e:  # refused, timed out, bad URL
        reason = getattr(e, "reason", None) or e
        return Response(None, "", f"{type(e).__name__}: {reason}")


# ----------------------------------------------------------------------------- sources
class NoticeSource(Protocol):
    """One thing to watch; ``poll`` never raises (the watcher guards it anyway)."""

    name: str

    def start(self, wake: Callable[[], None]) -> None: ...  # ``wake()`` asks for a poll now

    def poll(self) -> Parsed: ...

    def acknowledge(self, notice: Notice) -> Problem | None: ...  # after the final save is durable

    def close(self) -> None: ...


class _HttpSource:
    name = "?"

    def __init__(self, base_url: str, transport: Transport = http, clock: Callable[[], float] = time.time) -> None:
        self.base = base_url.rstrip("/")
        self.transport = transport
        self.clock = clock

    def start(self, wake: Callable[[], None]) -> None:
        pass

    def acknowledge(self, notice: Notice) -> Problem | None:
        return None

    def close(self) -> None:
        pass

    def _get(self, path: str, headers: Mapping[str, str]) -> Response:
        return self.transport("GET", self.base + path, headers, None, REQUEST_TIMEOUT)


class AwsSource(_HttpSource):
    """IMDSv2: a session token (renewed before it expires, and after a 401), then the two GETs."""

    name = "aws"

    def __init__(self, base_url: str, *, rebalance_stops: bool = False, transport: Transport = http,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(base_url, transport, clock)
        self.rebalance_stops = rebalance_stops
        self._token: str | None = None
        self._token_at = 0.0

    def poll(self) -> Parsed:
        if self._token is None or self.clock() - self._token_at > AWS_TOKEN_RENEW:
            resp = self.transport("PUT", self.base + "/latest/api/token",
                                  {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL)}, None,
                                  REQUEST_TIMEOUT)
            if resp.status != 200 or not resp.body.strip():
                return _bad_status(resp, "AWS IMDSv2 token (PUT /latest/api/token)")
            self._token, self._token_at = resp.body.strip(), self.clock()
        headers = {"X-aws-ec2-metadata-token": self._token}
        action = self._get("/latest/meta-data/spot/instance-action", headers)
        if action.status == 401:  # the token expired or was revoked: a new one at the next poll
            self._token = None
            return Problem("AWS IMDSv2 token refused (HTTP 401); getting a new one")
        parsed = parse_aws_action(action)
        if parsed is not None:
            return parsed
        return parse_aws_rebalance(self._get("/latest/meta-data/events/recommendations/rebalance", headers),
                                   stop=self.rebalance_stops)


class GcpSource(_HttpSource):
    """``instance/preempted`` and ``instance/maintenance-event``, plain polls (a long poll would hold the
    thread past ``stop()``)."""

    name = "gcp"
    _HEADERS: ClassVar[Mapping[str, str]] = {"Metadata-Flavor": "Google"}

    def poll(self) -> Parsed:
        now = self.clock()
        parsed = parse_gcp_preempted(self._get("/computeMetadata/v1/instance/preempted", self._HEADERS), now)
        if parsed is not None:
            return parsed
        return parse_gcp_maintenance(self._get("/computeMetadata/v1/instance/maintenance-event", self._HEADERS),
                                     now)


class AzureSource(_HttpSource):
    name = "azure"
    _HEADERS: ClassVar[Mapping[str, str]] = {"Metadata": "true"}

    @property
    def url(self) -> str:
        return f"{self.base}/metadata/scheduledevents?{AZURE_API}"

    def poll(self) -> Parsed:
        return parse_azure_events(self.transport("GET", self.url, self._HEADERS, None, REQUEST_TIMEOUT))

    def acknowledge(self, notice: Notice) -> Problem | None:
        """Tell Azure it may go ahead now (StartRequests): the final checkpoint is durable."""
        if notice.event_id is None:
            return None
        body = json.dumps({"StartRequests": [{"EventId": notice.event_id}]}).encode()
        resp = self.transport("POST", self.url, {**self._HEADERS, "Content-Type": "application/json"}, body,
                              REQUEST_TIMEOUT)
        if resp.status is not None and 200 <= resp.status < 300:
            return None
        return _bad_status(resp, f"Azure acknowledgement of {notice.event_id}")


class DrainSource:
    """The drain file: its existence is the notice. A watchdog observer on its directory wakes the watcher at
    once; the poll stays as the fallback (inotify misses files written by other hosts on NFS)."""

    name = "drain"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._observer: Any = None

    def start(self, wake: Callable[[], None]) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        target = str(self.path)

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if target in (event.src_path, getattr(event, "dest_path", "")):
                    wake()

        if not self.path.parent.is_dir():
            log.warning("drain file %s: its directory does not exist; polling for it", self.path)
            return
        try:
            observer = Observer()
            observer.schedule(_Handler(), str(self.path.parent), recursive=False)
            observer.daemon = True
            observer.start()
        except OSError as e:  # inotify limits reached, say: the poll still sees the file
            log.warning("drain file %s: cannot watch its directory (%s); polling for it", self.path, e)
            return
        self._observer = observer

    def poll(self) -> Parsed:
        if self.path.exists():
            return Notice("drain", None, f"drain file {self.path} exists")
        return None

    def acknowledge(self, notice: Notice) -> Problem | None:
        return None

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5.0)
            self._observer = None


# ----------------------------------------------------------------------------- watching
class _Watcher:
    """One source's thread: polls until it delivered a notice (and, if asked, acknowledged it) or is stopped."""

    def __init__(self, source: NoticeSource, interval: float, deliver: Callable[[Notice], None]) -> None:
        self.source, self.interval, self.deliver = source, interval, deliver
        self.wake = threading.Event()
        self.stopping = False
        self.ack_requested = False
        self.delivered: Notice | None = None
        self.acked = False
        self.thread = threading.Thread(target=self._run, name=f"ftrain-notices-{source.name}", daemon=True)

    def _run(self) -> None:
        failures, last_problem, advised = 0, None, set()
        while True:
            if self.delivered is None and not self.stopping:
                result = self._guarded(self.source.poll)
                if isinstance(result, Problem):
                    failures += 1
                    if result.reason != last_problem:  # once per distinct problem, not at every poll
                        log.warning("notices (%s): %s; retrying with backoff (at most %gs)", self.source.name,
                                    result.reason, BACKOFF_CAP)
                        last_problem = result.reason
                else:
                    if last_problem is not None:
                        log.info("notices (%s): answering again", self.source.name)
                    failures, last_problem = 0, None
                    if isinstance(result, Notice) and result.advisory:
                        if result.detail not in advised:
                            advised.add(result.detail)
                            log.warning("notices (%s): %s", self.source.name, result.detail)
                    elif isinstance(result, Notice):
                        self.delivered = result
                        self.deliver(result)
            if self.delivered is not None and self.ack_requested and not self.acked:
                problem = self._guarded(lambda: self.source.acknowledge(self.delivered))  # type: ignore[arg-type]
                if problem is None:
                    self.acked = True
                    if self.delivered.event_id is not None:
                        log.info("notices (%s): acknowledged %s", self.source.name, self.delivered.event_id)
                elif problem.reason != last_problem:
                    log.warning("notices (%s): %s; retrying", self.source.name, problem.reason)
                    last_problem = problem.reason
                    failures += 1
            if self.stopping or (self.delivered is not None and (self.acked or self.delivered.event_id is None)):
                return
            self.wake.wait(min(self.interval * 2 ** failures, max(BACKOFF_CAP, self.interval)))
            self.wake.clear()

    def _guarded(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as e:  # a bug in a source must never take the supervisor down: report it as data
            return Problem(f"internal error: {type(e).__name__}: {e}")


class NoticeWatch:
    """The watcher threads of every configured source. ``start`` once, ``stop`` on every exit path."""

    def __init__(self, sources: list[NoticeSource], interval: float) -> None:
        self.sources = sources
        self.interval = interval
        self._watchers: list[_Watcher] = []

    def drain_file(self) -> Path | None:
        """The drain file if it exists now (checked before the job starts), else None."""
        for s in self.sources:
            if isinstance(s, DrainSource) and s.path.exists():
                return s.path
        return None

    def start(self, deliver: Callable[[Notice], None]) -> None:
        for source in self.sources:
            watcher = _Watcher(source, self.interval, deliver)
            source.start(watcher.wake.set)
            self._watchers.append(watcher)
            watcher.thread.start()

    def acknowledge(self) -> None:
        """The final checkpoint is durable: acknowledge delivered notices that want it (Azure)."""
        for w in self._watchers:
            w.ack_requested = True
            w.wake.set()

    def stop(self, timeout: float = 2 * REQUEST_TIMEOUT + 5.0) -> None:
        """End every watcher (a requested acknowledgement gets one last try first) and its source."""
        for w in self._watchers:
            w.stopping = True
            w.wake.set()
        for w in self._watchers:
            w.thread.join(timeout)
            if w.thread.is_alive():
                log.warning("notices (%s): watcher did not stop within %gs", w.source.name, timeout)
            w.source.close()
        self._watchers = []


def build_watch(names: list[str], *, interval: float, aws_url: str, gcp_url: str, azure_url: str,
                drain_file: Path, rebalance_stops: bool, transport: Transport = http,
                clock: Callable[[], float] = time.time) -> NoticeWatch:
    """The watch of the sources named in ``supervisor.notices.sources`` (validated by the config)."""
    make: dict[str, Callable[[], NoticeSource]] = {
        "aws": lambda: AwsSource(aws_url, rebalance_stops=rebalance_stops, transport=transport, clock=clock),
        "gcp": lambda: GcpSource(gcp_url, transport, clock),
        "azure": lambda: AzureSource(azure_url, transport, clock),
        "drain": lambda: DrainSource(drain_file),
    }
    return NoticeWatch([make[n]() for n in names], interval)


