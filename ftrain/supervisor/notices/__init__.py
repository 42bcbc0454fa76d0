"""Preemption notices: cloud metadata services and a drain file, watched in supervisor threads.

A notice has the effect of a preemption signal to the supervisor (all ranks agree on a step, save,
exit 75): each source's watcher thread hands its first :class:`Notice` to a callback, which the
supervisor turns into :meth:`~ftrain.supervisor.supervisor.Supervisor.notify`. Unlike a signal, a
notice carries a deadline, which the supervisor logs with the time the final checkpoint became durable.

Layers, each testable alone:

* pure parsers (``parse_*``): one metadata :class:`Response` -> a :class:`Notice`, a :class:`Problem`
  (unreachable, refused, malformed: errors are data, never exceptions) or None (no notice);
* sources (:class:`AwsSource`, :class:`GcpSource`, :class:`AzureSource`, :class:`DrainSource`): one
  ``poll()`` each, HTTP through an injected :data:`Transport` (default :func:`http`, stdlib only);
* :class:`NoticeWatch`: one daemon thread per source, polling every ``interval`` seconds, with capped
  exponential backoff while a source answers with problems; each distinct problem is logged once.

Thread safety: parsers and sources are not shared between threads (each source is polled by its own
watcher thread only). :class:`NoticeWatch` methods are called from the supervisor's thread; the
``deliver`` callback runs on a watcher thread. ``stop()`` returns only after every watcher thread
(and the drain file's watchdog observer) has ended: no thread outlives the supervisor's ``run``.

What each source counts as a notice (docs/cloud.md):

* aws: IMDSv2 ``spot/instance-action`` answering 200 (404 is "none"); deadline its ``time``. The
  rebalance recommendation is advisory (logged once) unless ``supervisor.notices.aws_rebalance`` is ``stop``;
  it has no deadline of its own.
* gcp: ``instance/preempted`` == ``TRUE`` (deadline: first seen + 30 s) or ``instance/maintenance-event``
  other than ``NONE`` (first seen + 60 s).
* azure: a Scheduled Event with ``EventType: Preempt`` (deadline its ``NotBefore``); other event types are
  logged once. The event is acknowledged (``StartRequests``) only once :meth:`NoticeWatch.acknowledge`
  is called: after the final checkpoint is durable.
* drain: the drain file exists (docs/FORMAT.md, "Drain file"); no deadline.
"""
from __future__ import annotations

from ftrain.supervisor.notices.parse import (
    Notice,
    Parsed,
    Problem,
    Response,
    announce,
    deadline_report,
    format_time,
    iso_time,
    parse_aws_action,
    parse_aws_rebalance,
    parse_azure_events,
    parse_gcp_maintenance,
    parse_gcp_preempted,
)
from ftrain.supervisor.notices.watch import (
    SOURCES,
    AwsSource,
    AzureSource,
    DrainSource,
    GcpSource,
    NoticeSource,
    NoticeWatch,
    Transport,
    build_watch,
    http,
)

__all__ = ["SOURCES", "AwsSource", "AzureSource", "DrainSource", "GcpSource", "Notice", "NoticeSource",
           "NoticeWatch", "Parsed", "Problem", "Response", "Transport", "announce", "build_watch", "deadline_report",
           "format_time", "http", "iso_time", "parse_aws_action", "parse_aws_rebalance", "parse_azure_events",
           "parse_gcp_maintenance", "parse_gcp_preempted"]
