"""The attempt directory's JSON files read into typed records (ftrain/attempt.py; docs/FORMAT.md, "Attempt
directory"): what workers write reads back whole, the files keep their format, and hostile or malformed content is
skipped (an error file), read as no marker (preempted.json) or as a bare stop (stop.json): never a crash."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftrain import exitcodes
from ftrain.attempt import AttemptFiles, ErrorRecord, PreemptedRecord, StopRecord, worker_pid, write_error_file
from ftrain.errors import UsageError

ERROR_KEYS = {"rank", "pid", "group", "host", "time", "exc_type", "message", "traceback", "permanent", "exit_code"}
#: JSON texts no reader may trust: not JSON, not an object, wrong types, non-finite or absurd numbers, deep nesting.
HOSTILE = [b"{not json", b"[1, 2]", b'"text"', b"null", b"[" * 100_000, b'{"pid": "10"}', b'{"pid": true}',
           b'{"time": "soon"}', b'{"time": NaN}', b'{"time": Infinity}', b'{"time": 1' + b"0" * 400 + b"}",
           b'{"permanent": "yes"}', b'{"message": ["a"]}', b'{"exit_code": 2.5}', b'{"message": "\xff\xfe"}']


@pytest.fixture
def files(tmp_path: Path) -> AttemptFiles:
    f = AttemptFiles(tmp_path / "attempt-000")
    f.create()
    return f


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:
        return e


def test_an_error_file_reads_back_whole_and_keeps_its_format(files: AttemptFiles) -> None:
    write_error_file(files.error(3), 3, _raised(UsageError("bad batch")), group=2)
    assert set(json.loads(files.error(3).read_text())) == ERROR_KEYS  # the format: every key, as before
    [(rank, rec)] = files.read_errors().items()
    assert rank == 3 and isinstance(rec, ErrorRecord)
    assert (rec.rank, rec.pid, rec.group, rec.exc_type, rec.message) == (3, worker_pid(), 2, "UsageError",
                                                                          "bad batch")
    assert rec.permanent is True and rec.exit_code == exitcodes.USAGE
    assert rec.traceback is not None and "UsageError: bad batch" in rec.traceback
    assert files.mistakes() == ("bad batch",)


def test_an_old_error_file_reads_with_defaults(files: AttemptFiles) -> None:
    # Written before group, permanent and exit_code existed; an unknown key (a newer writer) is ignored.
    files.error(0).write_text(json.dumps({"rank": 0, "pid": 7, "host": "h", "time": 5, "exc_type": "ValueError",
                                          "message": "x", "traceback": "t", "future": {"a": 1}}))
    rec = files.read_errors()[0]
    assert rec == ErrorRecord(rank=0, pid=7, host="h", time=5.0, exc_type="ValueError", message="x",
                              traceback="t")
    assert (rec.group, rec.permanent, rec.exit_code) == (None, False, None)
    assert ErrorRecord().sort_time == 0.0  # no time: sorts first, as it always did


@pytest.mark.parametrize("content", HOSTILE)
def test_a_malformed_error_file_is_skipped(files: AttemptFiles, content: bytes) -> None:
    write_error_file(files.error(0), 0, _raised(ValueError("real")))
    files.error(1).write_bytes(content)
    assert list(files.read_errors()) == [0]
    assert files.mistakes() == ()


def test_only_rank_files_count(files: AttemptFiles) -> None:
    (files.root / "errors" / "rank-x.json").write_text("{}")
    (files.root / "errors" / "rank-00001.json.partial").write_text("{}")
    assert files.read_errors() == {}


def test_the_preemption_marker_round_trips(files: AttemptFiles) -> None:
    assert files.read_preempted() is None
    files.write_preempted(PreemptedRecord(7, rank=0, time=1.5, reason="received SIGTERM", pid=10, group=0))
    assert "remote_time" not in json.loads(files.preempted.read_text())  # absent without a remote tier, as before
    assert files.read_preempted() == PreemptedRecord(7, rank=0, time=1.5, reason="received SIGTERM", pid=10, group=0)
    files.write_preempted(PreemptedRecord(8, time=1.5, remote_time=9.0))
    assert json.loads(files.preempted.read_text())["remote_time"] == 9.0
    assert files.read_preempted() == PreemptedRecord(8, time=1.5, remote_time=9.0)
    assert sorted(p.name for p in files.root.iterdir() if p.is_file()) == ["preempted.json"]  # no .partial left


@pytest.mark.parametrize("content", [*HOSTILE, b"{}", b'{"pid": 10}', b'{"step": "7"}', b'{"step": 7.5}'])
def test_a_malformed_preemption_marker_is_no_marker(files: AttemptFiles, content: bytes) -> None:
    files.preempted.write_bytes(content)
    assert files.read_preempted() is None


@pytest.mark.parametrize("content", [*HOSTILE, b'{"signal": 15}', b'{"signal": "SIGTERM", "time": "now"}'])
def test_any_stop_marker_means_stop(files: AttemptFiles, content: bytes) -> None:
    assert files.read_stop() is None
    files.stop.write_bytes(content)
    assert files.read_stop() == StopRecord()  # present: a stop, whatever it holds
    files.write_stop("SIGUSR1", 2.0)
    assert files.read_stop() == StopRecord("SIGUSR1", 2.0)
