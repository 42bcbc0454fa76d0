"""Preemption notices without processes: the pure parsers, the log lines, and each watcher against an in-process
fake metadata server on 127.0.0.1 (tests/fake_clouds.py) or a scripted transport."""
from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_clouds import FakeAws, FakeAzure, FakeGcp

from ftrain.attempt import PreemptedRecord
from ftrain.config import NoticesConfig
from ftrain.errors import ConfigError
from ftrain.supervisor.notices import (
    AwsSource,
    AzureSource,
    DrainSource,
    GcpSource,
    Notice,
    NoticeWatch,
    Problem,
    Response,
    announce,
    deadline_report,
    http,
    iso_time,
    parse_aws_action,
    parse_aws_rebalance,
    parse_azure_events,
    parse_gcp_maintenance,
    parse_gcp_preempted,
)

NOW = 1_800_000_000.0
AZ_OK = "Mon, 19 Sep 2016 18:29:47 GMT"


def ok(body: str) -> Response:
    return Response(200, body)


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("ftrain-notices")]
    assert not left, f"watcher threads left running: {left}"


# ----------------------------------------------------------------------------- parsers
def test_aws_instance_action() -> None:
    assert parse_aws_action(Response(404, "Not Found")) is None
    n = parse_aws_action(ok('{"action": "terminate", "time": "2027-01-15T22:02:00Z"}'))
    assert isinstance(n, Notice) and n.source == "aws" and not n.advisory
    assert n.deadline == iso_time("2027-01-15T22:02:00Z") == 1800050520.0
    assert "terminate" in n.detail and n.name == "aws notice"


@pytest.mark.parametrize("resp", [
    ok("not json"), ok("[1, 2]"), ok('{"action": "terminate"}'), ok('{"action": 1, "time": "2027-01-15T22:02:00Z"}'),
    ok('{"action": "stop", "time": "yesterday"}'), Response(500, "oops"), Response(None, "", "ConnectionRefused"),
])
def test_aws_instance_action_problems_are_data(resp: Response) -> None:
    assert isinstance(parse_aws_action(resp), Problem)


def test_aws_rebalance_is_advisory_unless_configured_to_stop() -> None:
    assert parse_aws_rebalance(Response(404), stop=False) is None
    body = ok('{"noticeTime": "2027-01-15T22:00:00Z"}')
    log_only, stops = parse_aws_rebalance(body, stop=False), parse_aws_rebalance(body, stop=True)
    assert isinstance(log_only, Notice) and log_only.advisory and log_only.deadline is None
    assert isinstance(stops, Notice) and not stops.advisory and stops.source == "aws-rebalance"
    for bad in (ok("{}"), ok('{"noticeTime": "soon"}'), ok("<html>"), Response(503)):
        assert isinstance(parse_aws_rebalance(bad, stop=True), Problem)


def test_gcp_preempted_and_maintenance() -> None:
    assert parse_gcp_preempted(ok("FALSE"), NOW) is None
    n = parse_gcp_preempted(ok("TRUE\n"), NOW)
    assert isinstance(n, Notice) and n.source == "gcp" and n.deadline == NOW + 30
    assert parse_gcp_maintenance(ok("NONE"), NOW) is None
    m = parse_gcp_maintenance(ok("TERMINATE_ON_HOST_MAINTENANCE"), NOW)
    assert isinstance(m, Notice) and m.source == "gcp-maintenance" and m.deadline == NOW + 60
    for bad in (ok("maybe"), ok(""), Response(403, "Missing Metadata-Flavor:Google header.")):
        assert isinstance(parse_gcp_preempted(bad, NOW), Problem)
    for bad in (ok(""), ok("<html><body>proxy</body></html>"), Response(None, "", "timed out")):
        assert isinstance(parse_gcp_maintenance(bad, NOW), Problem)


def event(kind: str = "Preempt", not_before: str = AZ_OK, event_id: str = "e1") -> dict[str, object]:
    return {"EventId": event_id, "EventType": kind, "NotBefore": not_before, "EventStatus": "Scheduled"}


def test_azure_scheduled_events() -> None:
    assert parse_azure_events(ok('{"DocumentIncarnation": 0, "Events": []}')) is None
    n = parse_azure_events(ok(json.dumps({"Events": [event("Freeze", event_id="f"), event()]})))
    assert isinstance(n, Notice) and n.source == "azure" and n.event_id == "e1"
    assert n.deadline == 1474309787.0  # 2016-09-19 18:29:47 UTC
    assert parse_azure_events(ok(json.dumps({"Events": [event(not_before="")]}))).deadline is None  # type: ignore
    other = parse_azure_events(ok(json.dumps({"Events": [event("Reboot")]})))
    assert isinstance(other, Notice) and other.advisory and other.event_id is None


@pytest.mark.parametrize("body", ["", "null", '{"Events": {}}', '{"Events": [1]}', '{"Events": [{"EventType": 7}]}',
                                  json.dumps({"Events": [event(not_before="Someday")]}), '{"Other": 1}'])
def test_azure_malformed(body: str) -> None:
    assert isinstance(parse_azure_events(ok(body)), Problem)


# ----------------------------------------------------------------------------- log lines
def test_announce_says_source_deadline_and_warns_when_grace_does_not_fit() -> None:
    n = Notice("gcp", NOW + 30, "instance preempted")
    line = announce(n, NOW, grace=25)
    assert line.startswith("gcp notice: instance preempted; deadline 2027-01-15T08:00:30Z (in 30s)")
    assert "warning" not in line and "warning" in announce(n, NOW, grace=40)
    assert "no deadline" in announce(Notice("drain", None, "drain file x exists"), NOW, 30)


def test_deadline_report_prefers_remote_time() -> None:
    n = Notice("aws", NOW + 120, "x")
    local = deadline_report(n, PreemptedRecord(7, time=NOW + 20), 7)
    assert "final checkpoint at step 7 durable (local) at 2027-01-15T08:00:20Z, 100.0s before the deadline" in local
    remote = deadline_report(n, PreemptedRecord(7, time=NOW + 20, remote_time=NOW + 130), 7)
    assert "durable (remote)" in remote and "10.0s AFTER the deadline" in remote
    assert "no final checkpoint was committed after the notice" in deadline_report(n, None, 5)
    assert "step 5" in deadline_report(n, None, 5)
    assert "unknown time" in deadline_report(n, PreemptedRecord(7), 7)
    assert "deadline none" in deadline_report(Notice("drain", None, "d"), PreemptedRecord(1, time=NOW), 1)


# ----------------------------------------------------------------------------- config
def test_config_validates_notice_keys() -> None:
    assert NoticesConfig(sources=["aws", "drain"]).sources == ["aws", "drain"]
    with pytest.raises(ConfigError, match="'ibm' is not one of them"):
        NoticesConfig(sources=["ibm"])
    with pytest.raises(ConfigError, match="each at most once"):
        NoticesConfig(sources=["aws", "aws"])
    with pytest.raises(ConfigError, match="http:// or https:// URL"):
        NoticesConfig(aws_metadata_url="169.254.169.254")
    with pytest.raises(ConfigError, match=r"supervisor\.notices\.aws_rebalance"):
        NoticesConfig(aws_rebalance="ignore")
    with pytest.raises(ConfigError, match=r"supervisor\.notices\.poll_seconds"):
        NoticesConfig(poll_seconds=0)


# ----------------------------------------------------------------------------- sources against fakes
def wait_until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_fakes_require_their_headers() -> None:
    with FakeAws() as aws, FakeGcp() as gcp, FakeAzure() as az:
        assert http("GET", aws.url + "/latest/meta-data/spot/instance-action", {}).status == 401
        assert http("GET", aws.url + "/latest/meta-data/spot/instance-action",
                    {"X-aws-ec2-metadata-token": "guessed"}).status == 401
        assert http("GET", gcp.url + "/computeMetadata/v1/instance/preempted", {}).status == 403
        assert http("GET", az.url + "/metadata/scheduledevents?api-version=2020-07-01", {}).status == 400


def test_aws_source_uses_a_token_and_sees_the_notice() -> None:
    with FakeAws() as aws:
        src = AwsSource(aws.url)
        assert src.poll() is None
        aws.trigger()
        n = src.poll()
        assert isinstance(n, Notice) and n.deadline == pytest.approx(time.time() + 120, abs=5)
        assert [m for _, m, p, _ in aws.requests if p == "/latest/api/token"] == ["PUT"]  # one token, reused
        aws.tokens.clear()  # revoked: a 401, then a new token
        assert isinstance(src.poll(), Problem)
        assert isinstance(src.poll(), Notice) and len(aws.tokens) == 1


def test_aws_rebalance_stop_and_log() -> None:
    with FakeAws(rebalance_after=0.0) as aws:
        assert AwsSource(aws.url).poll().advisory  # type: ignore[union-attr]
        assert AwsSource(aws.url, rebalance_stops=True).poll().source == "aws-rebalance"  # type: ignore


def test_gcp_source_preempted_and_maintenance() -> None:
    with FakeGcp() as gcp, FakeGcp(maintenance=True) as maint:
        assert GcpSource(gcp.url).poll() is None and GcpSource(maint.url).poll() is None
        gcp.trigger()
        maint.trigger()
        assert GcpSource(gcp.url).poll().source == "gcp"  # type: ignore[union-attr]
        assert GcpSource(maint.url).poll().source == "gcp-maintenance"  # type: ignore[union-attr]


def test_an_unreachable_source_is_logged_once_and_retried_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []
    healthy = threading.Event()

    def transport(method: str, url: str, headers: object, data: object, timeout: float) -> Response:
        calls.append(time.monotonic())
        if healthy.is_set():
            return Response(200, "TRUE")
        return Response(None, "", "ConnectionRefusedError: [Errno 111] Connection refused")

    got: list[Notice] = []
    watch = NoticeWatch([GcpSource("http://127.0.0.1:9", transport)], interval=0.01)
    with caplog.at_level(logging.INFO, logger="ftrain.launch"):
        watch.start(got.append)
        wait_until(lambda: len(calls) >= 5)
        healthy.set()
        wait_until(lambda: got)
        watch.stop()
    gaps = [b - a for a, b in itertools.pairwise(calls[:4])]
    assert gaps == sorted(gaps) and gaps[-1] >= 0.03  # 0.02, 0.04, 0.08: backing off
    warnings = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, not at every poll
    assert any("answering again" in r.getMessage() for r in caplog.records)
    assert [n.source for n in got] == ["gcp"]


def test_malformed_answers_and_a_crashing_source_never_stop_the_watcher(caplog: pytest.LogCaptureFixture) -> None:
    answers = iter([Response(200, "<html>captive portal</html>")] * 3 + [RuntimeError("bug")] + [Response(200, "TRUE")])

    def transport(*args: object) -> Response:
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    got: list[Notice] = []
    watch = NoticeWatch([GcpSource("http://x", transport)], interval=0.001)
    with caplog.at_level(logging.WARNING, logger="ftrain.launch"):
        watch.start(got.append)
        wait_until(lambda: got)
        watch.stop()
    text = [r.getMessage() for r in caplog.records]
    assert sum("malformed" in t for t in text) == 1 and any("internal error: RuntimeError: bug" in t for t in text)


def test_watchers_deliver_once_at_a_random_moment_and_stop_cleanly() -> None:
    rng = random.Random()
    after = {name: rng.uniform(0.05, 0.4) for name in ("aws", "gcp", "azure")}
    with FakeAws(after["aws"]) as aws, FakeGcp(after["gcp"]) as gcp, FakeAzure(after["azure"]) as az:
        got: list[Notice] = []
        watch = NoticeWatch([AwsSource(aws.url), GcpSource(gcp.url), AzureSource(az.url)], interval=0.02)
        watch.start(got.append)
        wait_until(lambda: len(got) == 3)
        time.sleep(0.1)
        assert sorted(n.source for n in got) == ["aws", "azure", "gcp"]  # each once
        assert az.acks == []  # no acknowledgement before the final save is durable
        watch.acknowledge()
        wait_until(lambda: az.acks)
        watch.stop()
    assert [doc for _, doc in az.acks] == [{"StartRequests": [{"EventId": FakeAzure.EVENT_ID}]}]
    [azure] = [n for n in got if n.source == "azure"]
    assert azure.deadline == pytest.approx(time.time() + 30, abs=5)


def test_a_requested_ack_gets_a_last_try_on_stop() -> None:
    with FakeAzure(0.0) as az:
        got: list[Notice] = []
        watch = NoticeWatch([AzureSource(az.url)], interval=60.0)
        watch.start(got.append)
        wait_until(lambda: got)
        az.override["/metadata/scheduledevents?api-version=2020-07-01"] = (500, "down")
        watch.acknowledge()
        time.sleep(0.2)
        del az.override["/metadata/scheduledevents?api-version=2020-07-01"]
        watch.stop()  # the watcher is in its (long) backoff wait: stop wakes it for one more try
        assert len(az.acks) == 1


def test_drain_file_wakes_the_watcher_through_watchdog(tmp_path: Path) -> None:
    drain = tmp_path / "DRAIN"
    src = DrainSource(drain)
    watch = NoticeWatch([src], interval=600.0)  # only watchdog can deliver within the test's time
    assert watch.drain_file() is None
    got: list[Notice] = []
    watch.start(got.append)
    time.sleep(random.uniform(0.05, 0.3))
    drain.touch()
    wait_until(lambda: got, timeout=5)
    assert got[0].source == "drain" and got[0].deadline is None and str(drain) in got[0].detail
    assert watch.drain_file() == drain
    watch.stop()
    assert src._observer is None
    assert not [t for t in threading.enumerate() if "Observer" in type(t).__name__ or "Emitter" in type(t).__name__]


def test_stop_before_any_notice_ends_every_thread(tmp_path: Path) -> None:
    with FakeAws() as aws, FakeAzure() as az:
        watch = NoticeWatch([AwsSource(aws.url), AzureSource(az.url), DrainSource(tmp_path / "DRAIN")], 0.05)
        watch.start(lambda n: None)
        time.sleep(0.2)
        t0 = time.monotonic()
        watch.stop()
        assert time.monotonic() - t0 < 3
