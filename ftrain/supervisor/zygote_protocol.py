"""The records the zygote and its entry processes exchange on the zygote's Unix socket, and their framing.

Specified in docs/FORMAT.md, "Warm starts (zygote)". Each record is one frame: a 4-byte big-endian length, then
that many bytes of a UTF-8 JSON object whose ``"type"`` names the record. A spawn request carries the entry's
stdio file descriptors as SCM_RIGHTS ancillary data on its first bytes. Every record read is validated as
hostile input (field names and types): a peer that sends anything else gets a :class:`ProtocolError`.

Imported by the entry process (``entry.py``), which must start in milliseconds: standard library only, and
nothing heavy (no torch, no ftrain module beyond this one).
"""
from __future__ import annotations

import array
import dataclasses
import json
import os
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: Bumped on any incompatible change; the zygote answers :class:`Cold` to a request of another version.
PROTOCOL_VERSION = 1
#: A frame larger than this is refused (an environment of a few hundred KB is already unusual).
MAX_FRAME = 16 << 20
_HEADER = struct.Struct(">I")
#: fds 0, 1 and 2 at most travel with a request.
MAX_FDS = 3


class ProtocolError(ValueError):
    """A frame or record that does not follow docs/FORMAT.md, "Warm starts (zygote)"."""


@dataclass(frozen=True)
class Interpreter:
    """What decides how an interpreter behaves once started; a worker is forked only from an identical one."""

    executable: str
    version: str
    flags: str  # repr(sys.flags): -O, -B, -E, -I, -X dev, utf8 mode...
    warnoptions: list[str]
    xoptions: list[str]

    @classmethod
    def current(cls) -> Interpreter:
        return cls(sys.executable, sys.version, repr(sys.flags), list(sys.warnoptions),
                   sorted(f"{k}={v}" for k, v in sys._xoptions.items()))


@dataclass(frozen=True)
class SpawnRequest:
    """Entry -> zygote: fork a worker that runs ``target`` as ``python [-m] target args...`` would."""

    type: ClassVar[str] = "spawn"
    version: int
    target: str  # the script's path (as given), or a module name when ``module``
    module: bool
    args: list[str]
    env: dict[str, str]
    cwd: str
    #: Which of fds 0, 1, 2 the entry had open; those travel with the request, in that order.
    stdio: list[bool]
    unbuffered: bool  # -u or PYTHONUNBUFFERED: how sys.stdout and sys.stderr are built
    #: Signals the entry inherited as ignored (a fresh interpreter keeps them ignored) and its blocked mask.
    ignored_signals: list[int]
    blocked_signals: list[int]
    umask: int
    affinity: list[int]  # CPUs the entry may run on (torchrun's --numa-binding sets them)
    orig_argv: list[str]  # sys.orig_argv as the worker should see it: the entry's, without "-m <entry>"
    interpreter: Interpreter


@dataclass(frozen=True)
class StatusRequest:
    """Anyone -> zygote: describe yourself (tests, diagnostics)."""

    type: ClassVar[str] = "status"
    version: int


@dataclass(frozen=True)
class Started:
    """Zygote -> entry: the worker was forked; its pid."""

    type: ClassVar[str] = "started"
    pid: int


@dataclass(frozen=True)
class Cold:
    """Zygote -> entry: no warm worker for this request; start cold. ``reason`` is one line."""

    type: ClassVar[str] = "cold"
    reason: str


@dataclass(frozen=True)
class Exited:
    """Zygote -> entry: the worker ended; ``returncode`` as subprocess reports it (-N: killed by signal N)."""

    type: ClassVar[str] = "exited"
    returncode: int


@dataclass(frozen=True)
class Status:
    """Zygote -> asker: its state after preloading."""

    type: ClassVar[str] = "status-reply"
    pid: int
    state: str  # "warm" or "cold"
    reason: str  # why cold; empty when warm
    preloaded: list[str]
    skipped: list[str]  # "name: why" for each module not preloaded
    threads: int  # threads of the zygote now (1 when warm)
    #: torch.cuda.is_initialized() as the zygote last checked it; None when torch is not imported there.
    cuda_initialized: bool | None
    #: Running workers: entry pid (as a string: a JSON key) -> worker pid.
    workers: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerTable:
    """The file ``<socket>.workers``: the zygote's running workers, rewritten (renamed into place) at each
    fork and exit, so the supervisor finds the real worker behind each entry pid without asking the zygote."""

    type: ClassVar[str] = "workers"
    version: int
    zygote: int
    #: entry pid (string) -> [worker pid, wall-clock time of the fork].
    workers: dict[str, list[float]]


RECORDS: dict[str, type[Any]] = {c.type: c for c in (SpawnRequest, StatusRequest, Started, Cold, Exited, Status,
                                                      WorkerTable)}

# Field types as they are written (``from __future__ import annotations`` keeps them strings): what a value read
# from JSON must be. bool is an int in Python; JSON keeps them apart, and so do these checks.
_CHECKS: dict[str, Any] = {
    "int": lambda v: type(v) is int,
    "str": lambda v: type(v) is str,
    "bool": lambda v: type(v) is bool,
    "bool | None": lambda v: v is None or type(v) is bool,
    "list[str]": lambda v: type(v) is list and all(type(x) is str for x in v),
    "list[int]": lambda v: type(v) is list and all(type(x) is int for x in v),
    "list[bool]": lambda v: type(v) is list and all(type(x) is bool for x in v),
    "dict[str, str]": lambda v: type(v) is dict and all(type(x) is str for x in v.values()),
    "dict[str, int]": lambda v: type(v) is dict and all(type(x) is int for x in v.values()),
    "dict[str, list[float]]": lambda v: type(v) is dict and all(
        type(x) is list and all(type(n) in (int, float) for n in x) for x in v.values()),
}


def to_json(record: Any) -> dict[str, Any]:
    return {"type": record.type, **dataclasses.asdict(record)}


def from_json(obj: object, expect: tuple[type[Any], ...] = ()) -> Any:
    """The record ``obj`` (a decoded JSON object) holds; ``expect``: the record types acceptable here."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    cls = RECORDS.get(obj.get("type"))  # type: ignore[arg-type]
    if cls is None or (expect and cls not in expect):
        raise ProtocolError(f"unexpected record type {obj.get('type')!r}")
    return _build(cls, obj)


def _build(cls: type[Any], obj: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(obj) - set(fields) - {"type"}
    if unknown:
        raise ProtocolError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.__name__}: missing field {name!r}")
            continue
        value = obj[name]
        if f.type == "Interpreter":
            if not isinstance(value, dict):
                raise ProtocolError(f"{cls.__name__}.{name}: expected an object")
            value = _build(Interpreter, value)
        elif not _CHECKS[str(f.type)](value):
            raise ProtocolError(f"{cls.__name__}.{name}: expected {f.type}, got {type(value).__name__}")
        values[name] = value
    return cls(**values)


def encode(record: Any) -> bytes:
    body = json.dumps(to_json(record), separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"record of {len(body)} bytes exceeds the {MAX_FRAME} byte frame limit")
    return _HEADER.pack(len(body)) + body


def send(sock: socket.socket, record: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one frame; ``fds`` ride on its first bytes (SCM_RIGHTS)."""
    data = encode(record)
    if fds:
        # A stream socket may take fewer bytes than offered (a signal mid-send): the rest follows with sendall,
        # the descriptors stay attached to the first part.
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    if data:  # never an empty send: it fails (EPIPE) once the peer answered and closed
        sock.sendall(data)


def recv(sock: socket.socket, expect: tuple[type[Any], ...] = (), *,
         with_fds: bool = False) -> tuple[Any, list[int]] | None:
    """Read one frame: ``(record, fds)``, or None at a clean end of stream (the peer closed before a frame).

    Raises :class:`ProtocolError` for a malformed frame, ``OSError`` (``TimeoutError`` included) from the socket.
    Received descriptors are close-on-exec; on an error they are closed here.
    """
    fds: list[int] = []
    try:
        head = _recv_exactly(sock, _HEADER.size, fds if with_fds else None)
        if head is None:
            return None
        (size,) = _HEADER.unpack(head)
        if size > MAX_FRAME:
            raise ProtocolError(f"frame of {size} bytes exceeds the {MAX_FRAME} byte limit")
        body = _recv_exactly(sock, size, fds if with_fds else None)
        if body is None:
            raise ProtocolError("connection closed inside a frame")
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise ProtocolError(f"frame is not JSON: {e}") from None
        return from_json(obj, expect), fds
    except BaseException:
        for fd in fds:
            _close(fd)
        raise


def _recv_exactly(sock: socket.socket, n: int, fds: list[int] | None) -> bytes | None:
    """``n`` bytes (None if the stream ends before the first); ``fds``: collect descriptors riding on them."""
    buf = b""
    while len(buf) < n:
        if fds is not None:
            chunk, anc, flags, _ = sock.recvmsg(n - len(buf), socket.CMSG_SPACE(MAX_FDS * 4),
                                                socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                    fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} file descriptors sent")
        else:
            chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ProtocolError("connection closed inside a frame")
            return None
        buf += chunk
    return buf


def kill_group(pid: int, sig: int, *, group_only: bool = False) -> None:
    """Signal worker ``pid``: its process group (a worker leads its own, as a cold one under torchrun does, so
    its children get the signal too), or ``pid`` alone if it has no group yet (in the instant before its setsid);
    ``group_only``: not even then. A process already gone is no error."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        if not group_only:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    except PermissionError:
        pass


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
