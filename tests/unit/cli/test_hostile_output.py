"""Hostile checkpoint contents cannot drive the terminal: ``ftrain ckpt`` output is sanitised (issue 10).

The checkpoints are made the way an attacker would: a real one written by
``ftrain.Session``, then its manifest edited to carry terminal escape sequences
and line breaks, and resealed (body checksum recomputed) so that it validates.
Every command runs in process through ``ftrain.cli.main``; no ESC, BEL, CR or
other control character may reach stdout or stderr, and the escaped form must
be visible (the user still sees what the field held).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

import ftrain
from ftrain.checkpoint.manifest import FORMAT_VERSION
from ftrain.checkpoint.store import CheckpointStore
from ftrain.cli import main as cli
from ftrain.errors import CorruptCheckpoint, printable

pytest.importorskip("safetensors.torch")

#: Clears the screen, retitles the window (OSC 0 ... BEL), forges a new line, flips the text direction
#: (U+202E) and opens a C1 CSI (U+009B): what a hostile field would hold.
EVIL = "\x1b[2J\x1b]0;pwned\x07\r\nforged\u202e\x9b1m"
#: The same, as it must be printed: each offending character replaced by its escape, the rest kept.
SHOWN = "\\x1b[2J\\x1b]0;pwned\\x07\\x0d\\x0aforged\\u202e\\x9b1m"
#: A metric name with a non-ASCII letter: ordinary text is kept intact.
NAME = "lossé" + EVIL
NAME_SHOWN = "lossé" + SHOWN
#: Control characters that must never be printed (the line feed is the only one allowed, between lines).
FORBIDDEN = ("\x1b", "\x07", "\r", "\x9b", "\u202e", "\x00", "\x08", "\x0b", "\x0c", "\x85", "\u2028")
#: The start of a "skipping" warning for step 3 (the store says step-000000000003, the reader step 3).
SKIP_3 = re.compile(r"ftrain: warning: skipping checkpoint step[- ]0*3: ")


def assert_clean(text: str) -> None:
    for c in FORBIDDEN:
        assert c not in text, f"{c!r} printed: {text!r}"
    bad = sorted({c for c in text if c != "\n" and not c.isprintable()})
    assert not bad, f"non-printable characters {bad} printed: {text!r}"
    # The payload's own line break must not start a line of output.
    assert not any(line.startswith("forged") for line in text.splitlines()), text


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli(["ckpt", *argv])
    out, err = capsys.readouterr()
    assert_clean(out)
    assert_clean(err)
    return code, out, err


def reseal(step_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit a manifest body and recompute its checksum exactly as ``ftrain/checkpoint/manifest.py`` does."""
    path = step_dir / "manifest.json"
    doc = json.loads(path.read_text())
    body = doc["body"]
    edit(body)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    doc["body_xxh3_128"] = xxhash.xxh3_128_hexdigest(canonical)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:012d}"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real three-step checkpoint root, written by a Session (copied, then edited, by each test)."""
    root = tmp_path_factory.mktemp("pristine") / "ckpt"
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = ftrain.Session(overrides={"checkpoint.dir": str(root), "checkpoint.async_save": False,
                                        "checkpoint.retention.keep_last": 0})
    session.register(model=model, optimizer=opt)
    session.restore()
    for step in (1, 2, 3):
        model(torch.randn(3, 2)).sum().backward()
        opt.step()
        session.save(step, blocking=True)
    session.close()
    return root


def hostile_meta(body: dict[str, Any], value: float) -> None:
    """Hostile text in every field a command prints, the checkpoint still consistent (verify checks that too):
    the object EVIL names is in the tree (:func:`add_evil_object`), the parameter it omits is recorded frozen."""
    meta = body["meta"]
    meta["metrics"] = {NAME: value, "note": EVIL}
    meta["monitor"] = {"name": NAME, "mode": "min"}
    meta["replicated"] = [*meta["replicated"], EVIL]
    meta["config"] = {EVIL: {EVIL: EVIL}}
    meta["trainable_only"] = True  # so that export prints its note, which quotes the base fingerprint
    meta["frozen"] = {"model": ["frozen.weight"]}
    meta["omitted"] = {"model": ["frozen.weight"]}
    meta["base_fingerprint"] = {"model": EVIL}
    body["ftrain_version"] = EVIL
    body["torch_version"] = EVIL


def add_evil_object(step_dir: Path) -> None:
    """An object named EVIL in the replicated tree (rank 0's shard record), its new size and checksum resealed."""
    path = step_dir / "shard-00000.json"
    record = json.loads(path.read_text())
    record["trees"]["replicated"][EVIL] = {}
    data = json.dumps(record).encode()
    path.write_bytes(data)
    reseal(step_dir, lambda b: b["files"]["shard-00000.json"].update(size=len(data),
                                                                      checksum=xxhash.xxh3_128_hexdigest(data)))


def add_evil_tensor(body: dict[str, Any]) -> None:
    # A second index entry for an existing extent, under a hostile name: inspect lists it (the reader would
    # refuse the overlap, so only step 1, which export does not pick, gets it).
    body["tensors"][f"replicated/{EVIL}/t"] = dict(body["tensors"]["replicated/model/bias"])


@pytest.fixture
def hostile(pristine: Path, tmp_path: Path) -> Path:
    """Steps 1 and 2 valid with hostile fields; step 3 corrupt: a format version string carrying the payload."""
    root = tmp_path / "ckpt"
    shutil.copytree(pristine, root)
    for step in (1, 2):
        add_evil_object(step_dir(root, step))
    reseal(step_dir(root, 1), lambda b: (hostile_meta(b, 0.7), add_evil_tensor(b)))
    reseal(step_dir(root, 2), lambda b: hostile_meta(b, 0.5))
    reseal(step_dir(root, 3), lambda b: b.update(format_version="1" + EVIL))
    return root


def test_the_rule() -> None:
    assert printable(EVIL) == SHOWN
    assert printable(NAME) == NAME_SHOWN
    assert printable("plain ascii, ünïcödé, 日本語, emoji 🎉") == "plain ascii, ünïcödé, 日本語, emoji 🎉"
    assert printable("tab\there") == "tab\\x09here"
    assert printable("\udcff") == "\\udcff"  # a lone surrogate: an undecodable byte in a file name
    assert printable("\U000e0001") == "\\U000e0001"  # a format character outside the BMP (language tag)
    assert printable(SHOWN) == SHOWN  # idempotent: the output is all printable
    assert printable(Path("/a\x1bb")) == "/a\\x1bb"


def test_corrupt_checkpoint_sanitises_path_and_reason_at_the_source() -> None:
    err = CorruptCheckpoint(f"/ckpt{EVIL}/manifest.json", f"format version {EVIL}")
    assert err.path == f"/ckpt{SHOWN}/manifest.json"
    assert err.reason == f"format version {SHOWN}"
    assert str(err) == f"/ckpt{SHOWN}/manifest.json: format version {SHOWN}"


def test_skipping_warning_logged_while_reading_is_sanitised(tmp_path: Path, pristine: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    # Training reads through the store too, and logs with whatever handler the job set up: the warning's
    # text itself must be safe, not only what ftrain ckpt prints.
    root = tmp_path / f"run{EVIL}"
    shutil.copytree(pristine, root)
    (step_dir(root, 3) / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        assert [m.step for m in CheckpointStore(root).manifests()] == [1, 2]
    [record] = [r for r in caplog.records if "skipping checkpoint step 3" in r.getMessage()]
    message = record.getMessage()
    assert_clean(message)
    assert f"run{SHOWN}" in message and "manifest missing" in message


def test_any_warning_printed_by_ckpt_commands_is_sanitised(capsys: pytest.CaptureFixture[str]) -> None:
    from ftrain.cli import show

    with show.warnings_to_stderr():
        logging.getLogger("ftrain.checkpoint").warning("odd entry %s", EVIL)  # not from a CorruptCheckpoint
    err = capsys.readouterr().err
    assert_clean(err)
    assert err == f"ftrain: warning: odd entry {SHOWN}\n"


def test_ls_table_and_json(hostile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ls", str(hostile))
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4  # header + three rows: the payload's CR LF forged no line
    assert NAME_SHOWN[:12] in lines[0]  # the monitor's name heads the metric column
    assert "-  CORRUPT: manifest.json: format version" in lines[3]
    assert repr("1" + EVIL) in lines[3]  # the reason quotes the version, escaped
    assert "0.5" in lines[2] and lines[2].endswith("<- best")

    code, out, _ = run(capsys, "ls", str(hostile), "--json")
    assert code == 0
    doc = json.loads(out)  # JSON-escaped in transport; the values themselves survive
    assert doc["monitor"] == {"name": NAME, "mode": "min"}
    assert doc["checkpoints"][1]["metrics"] == {NAME: 0.5, "note": EVIL}
    assert doc["checkpoints"][2]["status"] == "corrupt"


def test_verify(hostile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", str(hostile))
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 4 and lines[-1] == "2 valid, 1 corrupt"
    assert lines[2].startswith("CORRUPT  step 3") and repr("1" + EVIL) in lines[2]


def test_inspect_text(hostile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", str(hostile), "--step", "1", "--verify")
    assert code == 0, err
    rows = {line[:12].strip(): line[13:] for line in out.splitlines() if not line.startswith(" ")}
    assert rows["versions"] == f"format {FORMAT_VERSION}, ftrain {SHOWN}, torch {SHOWN}"
    assert rows["objects"].startswith(f"replicated: model, optimizer, {SHOWN};")
    assert rows["metrics"] == f"{NAME_SHOWN}=0.7  note={json.dumps(EVIL)}"
    assert rows["monitor"] == f"{NAME_SHOWN} (min)"
    assert f"base fingerprint model={SHOWN}" in rows["trainable"]
    assert f"  {SHOWN}.{SHOWN} = {json.dumps(EVIL)}" in out.splitlines()  # config
    assert f"replicated/{SHOWN}/t" in out  # the tensor table
    # --json: every value as it is, JSON-escaped
    code, out, _ = run(capsys, "inspect", str(hostile), "--step", "1", "--json")
    doc = json.loads(out)
    assert doc["monitor"]["name"] == NAME and doc["ftrain_version"] == EVIL and f"replicated/{EVIL}/t" in {
        t["name"] for t in doc["tensors"]}


def test_inspect_latest_warns_past_the_corrupt_one(hostile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", str(hostile), "--verify")
    assert code == 0 and "step         2" in out
    assert SKIP_3.match(err) and repr("1" + EVIL) in err
    assert len(err.splitlines()) == 1
    code, out, err = run(capsys, "inspect", str(hostile), "--step", "3")
    assert code == 1 and out == "" and err.startswith("ftrain: error: ") and len(err.splitlines()) == 1


def test_export_messages(hostile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / f"out{EVIL}"
    out_dir.mkdir()
    code, out, err = run(capsys, "export", str(hostile), str(out_dir / "w.safetensors"))
    assert code == 0, err
    assert out.startswith("exported step 2 ") and f"out{SHOWN}" in out
    warning, note = err.splitlines()  # one line each
    assert SKIP_3.match(warning) and repr("1" + EVIL) in warning
    assert note.startswith("ftrain: note: step 2 is a trainable-only") and f"fingerprint {SHOWN}" in note
    assert f"out{SHOWN}" in note

    # An error listing the checkpoint's metric names (the template's fields): the main() error line.
    code, out, err = run(capsys, "export", str(hostile), str(tmp_path / "w-{nope}.pt"), "--step", "2")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("ftrain: error: cannot fill the OUT template") and NAME_SHOWN in err


def test_root_path_with_escapes(pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / f"run{EVIL}"
    shutil.copytree(pristine, root)
    shown = str(tmp_path / f"run{SHOWN}")
    code, out, _ = run(capsys, "verify", str(root))
    assert code == 0 and out.splitlines()[0] == f"ok       step 1  {shown}/step-000000000001"
    code, out, _ = run(capsys, "inspect", str(root))
    assert code == 0 and out.splitlines()[0] == f"checkpoint   {shown}/step-000000000003"
    assert json.loads(run(capsys, "ls", str(root), "--json")[1])["dir"] == str(root)
    # Errors that quote the root (raw in the message) go through main()'s error line.
    code, _, err = run(capsys, "verify", str(root), "99")
    assert code == 2 and err == f"ftrain: error: no checkpoint for step 99 in {shown}\n"
    code, _, err = run(capsys, "export", str(root), str(tmp_path / "w.pt"), "--step", "best")
    assert code == 1 and err.startswith(f"ftrain: error: {shown}: ") and len(err.splitlines()) == 1
    # A damaged checkpoint: the warning and the error name the file under the root, escaped.
    (step_dir(root, 3) / "shard-00000.bin").write_bytes(b"")
    code, out, err = run(capsys, "export", str(root), str(tmp_path / "w.pt"))
    assert code == 0 and SKIP_3.match(err) and f": {shown}/step-000000000003/shard-00000.bin: size 0" in err
    code, out, err = run(capsys, "ls", str(root))
    assert code == 0 and "CORRUPT: shard-00000.bin: size 0 bytes" in out.splitlines()[3]
    for step in (1, 2, 3):
        shutil.rmtree(step_dir(root, step))
    code, out, _ = run(capsys, "ls", str(root))
    assert code == 0 and out == f"no checkpoints in {shown}\n"
    code, out, _ = run(capsys, "verify", str(root))
    assert code == 1 and out == f"no checkpoints in {shown}\n"


@pytest.mark.skipif(os.name != "posix", reason="needs a file name that is not valid UTF-8")
def test_undecodable_root_name(pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/run\xff"))  # str with a lone surrogate: \udcff
    try:
        shutil.copytree(pristine, root)
    except OSError:  # pragma: no cover - a filesystem that insists on UTF-8 names
        pytest.skip("filesystem refuses a non-UTF-8 file name")
    # Printed raw, the surrogate would not even encode (UnicodeEncodeError); escaped it is visible.
    code, out, _ = run(capsys, "verify", str(root))
    assert code == 0 and f"{tmp_path}/run\\udcff/step-000000000001" in out
