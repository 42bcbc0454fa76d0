"""Preemption notices, the pure part: the types, one parser per metadata answer, and the lines the log says.

No I/O and no clock: ``now`` is passed in. Each parser maps one :class:`Response` to a :class:`Notice`, a
:class:`Problem` (errors are data: unreachable, refused, malformed) or None (no notice). See the package
docstring for what each source counts as a notice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from ftrain.attempt import PreemptedRecord

#: Lead times (seconds) that GCP does not state in its answer: a Spot VM's ACPI soft-off, a maintenance event.
GCP_PREEMPT_LEAD, GCP_MAINTENANCE_LEAD = 30.0, 60.0


@dataclass(frozen=True)
class Notice:
    """A preemption notice (or, ``advisory``, a warning that only gets logged)."""

    source: str  # aws, aws-rebalance, gcp, gcp-maintenance, azure, drain
    deadline: float | None  # epoch seconds by which the machine goes away; None: not announced
    detail: str
    advisory: bool = False
    event_id: str | None = None  # Azure: the Scheduled Event to acknowledge

    @property
    def name(self) -> str:
        """What the supervisor records in place of a signal name (never starts with "SIG")."""
        return f"{self.source} notice"


@dataclass(frozen=True)
class Problem:
    """Why a poll gave no answer: the endpoint unreachable or refusing, or an answer we cannot read."""

    reason: str


Parsed = Notice | Problem | None


@dataclass(frozen=True)
class Response:
    """One HTTP exchange: ``status`` None when no answer came (``error`` says why)."""

    status: int | None
    body: str = ""
    error: str | None = None


# ----------------------------------------------------------------------------- pure parsers
def iso_time(text: str) -> float:
    """``2026-12-01T23:59:00Z`` (AWS) as epoch seconds; ValueError if it is not such a time."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def format_time(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bad_status(resp: Response, what: str) -> Problem:
    if resp.status is None:
        return Problem(f"cannot reach {what} ({resp.error})")
    return Problem(f"{what} answered HTTP {resp.status}: {resp.body[:200]!r}")


def _json_object(resp: Response, what: str) -> dict[str, Any] | Problem:
    try:
        doc = json.loads(resp.body)
    except ValueError:
        return Problem(f"{what}: malformed answer (not JSON): {resp.body[:200]!r}")
    if not isinstance(doc, dict):
        return Problem(f"{what}: malformed answer (not a JSON object): {resp.body[:200]!r}")
    return doc


def parse_aws_action(resp: Response) -> Parsed:
    """``spot/instance-action``: 404 none; 200 ``{"action": "terminate"|"stop"|"hibernate", "time": ISO}``."""
    what = "AWS spot/instance-action"
    if resp.status == 404:
        return None
    if resp.status != 200:
        return _bad_status(resp, what)
    doc = _json_object(resp, what)
    if isinstance(doc, Problem):
        return doc
    action, when = doc.get("action"), doc.get("time")
    if not isinstance(action, str) or not isinstance(when, str):
        return Problem(f"{what}: malformed answer (needs string action and time): {resp.body[:200]!r}")
    try:
        deadline = iso_time(when)
    except ValueError:
        return Problem(f"{what}: malformed time {when!r}")
    return Notice("aws", deadline, f"spot instance-action {action} at {when}")


def parse_aws_rebalance(resp: Response, *, stop: bool) -> Parsed:
    """``events/recommendations/rebalance``: 404 none; 200 ``{"noticeTime": ISO}`` (advisory unless ``stop``)."""
    what = "AWS rebalance recommendation"
    if resp.status == 404:
        return None
    if resp.status != 200:
        return _bad_status(resp, what)
    doc = _json_object(resp, what)
    if isinstance(doc, Problem):
        return doc
    when = doc.get("noticeTime")
    if not isinstance(when, str):
        return Problem(f"{what}: malformed answer (needs a string noticeTime): {resp.body[:200]!r}")
    try:
        iso_time(when)
    except ValueError:
        return Problem(f"{what}: malformed noticeTime {when!r}")
    how = f"{'' if stop else 'not '}stopping (supervisor.notices.aws_rebalance={'stop' if stop else 'log'})"
    return Notice("aws-rebalance", None, f"rebalance recommendation issued at {when}; {how}", advisory=not stop)


def parse_gcp_preempted(resp: Response, now: float) -> Parsed:
    """``instance/preempted``: ``TRUE`` (a notice, deadline ``now`` + 30 s) or ``FALSE``."""
    what = "GCP instance/preempted"
    if resp.status != 200:
        return _bad_status(resp, what)
    value = resp.body.strip()
    if value == "FALSE":
        return None
    if value == "TRUE":
        return Notice("gcp", now + GCP_PREEMPT_LEAD, "instance preempted (ACPI soft-off, 30 s to the hard stop)")
    return Problem(f"{what}: malformed answer (expected TRUE or FALSE): {value[:200]!r}")


def parse_gcp_maintenance(resp: Response, now: float) -> Parsed:
    """``instance/maintenance-event``: ``NONE``, else a notice with deadline ``now`` + 60 s."""
    what = "GCP instance/maintenance-event"
    if resp.status != 200:
        return _bad_status(resp, what)
    value = resp.body.strip()
    if value == "NONE":
        return None
    if not value or not value.replace("_", "").isalnum():
        return Problem(f"{what}: malformed answer: {value[:200]!r}")
    return Notice("gcp-maintenance", now + GCP_MAINTENANCE_LEAD, f"maintenance event {value} (60 s ahead)")


def parse_azure_events(resp: Response) -> Parsed:
    """Scheduled Events: the first ``Preempt`` event is a notice (deadline ``NotBefore``, RFC 1123, or None
    when empty); any other event is advisory."""
    what = "Azure scheduledevents"
    if resp.status != 200:
        return _bad_status(resp, what)
    doc = _json_object(resp, what)
    if isinstance(doc, Problem):
        return doc
    events = doc.get("Events")
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        return Problem(f"{what}: malformed answer (Events must be a list of objects): {resp.body[:200]!r}")
    other: Notice | None = None
    for event in events:
        kind, event_id, not_before = event.get("EventType"), event.get("EventId"), event.get("NotBefore", "")
        if not isinstance(kind, str) or not isinstance(event_id, str) or not isinstance(not_before, str):
            return Problem(f"{what}: malformed event (needs string EventType, EventId, NotBefore): {event!r:.200}")
        if kind != "Preempt":
            other = other or Notice("azure-event", None, f"scheduled event {kind} ({event_id}) not before "
                                    f"{not_before or '?'}: not a preemption, not stopping", advisory=True)
            continue
        deadline: float | None = None
        if not_before:
            try:
                deadline = parsedate_to_datetime(not_before).timestamp()
            except (TypeError, ValueError):
                return Problem(f"{what}: malformed NotBefore {not_before!r}")
        return Notice("azure", deadline, f"scheduled event Preempt ({event_id}) not before {not_before or '?'}",
                      event_id=event_id)
    return other


# ----------------------------------------------------------------------------- what the log says
def announce(notice: Notice, now: float, grace: float) -> str:
    """The line logged when a notice arrives: source, detail, deadline, and whether grace fits before it."""
    if notice.deadline is None:
        return f"{notice.name}: {notice.detail}; no deadline announced; stopping"
    left = notice.deadline - now
    line = f"{notice.name}: {notice.detail}; deadline {format_time(notice.deadline)} (in {left:.0f}s); stopping"
    if left < grace:
        line += (f" (warning: supervisor.grace_seconds={grace:g} runs past the deadline; the machine may go "
                 "before the final save)")
    return line


def deadline_report(notice: Notice, marker: PreemptedRecord | None, newest: int | None) -> str:
    """The closing line: whether the final checkpoint was durable before the notice's deadline.

    ``marker`` is the attempt's preempted.json: ``remote_time`` (durable in the remote tier) wins over ``time``
    (the local commit).
    """
    head = f"{notice.name}: deadline {format_time(notice.deadline) if notice.deadline is not None else 'none'}"
    if marker is None:
        return (f"{head}; no final checkpoint was committed after the notice (the newest checkpoint, "
                f"{'step ' + str(newest) if newest is not None else 'none'}, was committed before it)")
    remote = marker.remote_time is not None
    when = marker.remote_time if remote else marker.time
    if when is None:
        return f"{head}; final checkpoint at step {marker.step} (durable at an unknown time)"
    tier = "remote" if remote else "local"
    line = f"{head}; final checkpoint at step {marker.step} durable ({tier}) at {format_time(when)}"
    if notice.deadline is None:
        return line
    margin = notice.deadline - when
    return line + (f", {margin:.1f}s before the deadline" if margin >= 0 else
                   f", {-margin:.1f}s AFTER the deadline")
