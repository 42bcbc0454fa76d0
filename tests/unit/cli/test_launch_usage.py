"""`ftrain launch` on bad input, in-process: one line, exit 2, and nothing started (no process is needed to check
this; tests/integration covers what a worker reports)."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from helpers import EXAMPLE


@pytest.mark.parametrize("case", ["bad_key", "bad_value", "renamed_and_new", "missing_script", "unwritable_dir"])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], case: str) -> None:
    import ftrain.supervisor.supervisor as supervisor
    from ftrain.cli import main
    from ftrain.signals import EARLY_SIGNALS

    args = ["--ckpt-dir", str(tmp_path / "ckpt")]
    if case in ("bad_key", "renamed_and_new"):
        cfg = tmp_path / "c.yaml"
        cfg.write_text("checkpoint:\n  evry_steps: 5\n" if case == "bad_key" else
                       "checkpoint:\n  keep_last: 2\n  retention:\n    keep_last: 3\n")
        args += ["--config", str(cfg)]
    elif case == "bad_value":
        args += ["--keep-last", "-1"]
    elif case == "unwritable_dir":
        (tmp_path / "file").write_text("")
        args = ["--ckpt-dir", str(tmp_path / "file" / "ckpt")]
    script = str(tmp_path / "nope.py") if case == "missing_script" else str(EXAMPLE)
    started: list[object] = []
    monkeypatch.setattr(supervisor, "Supervisor", lambda *a, **k: started.append(a))
    saved = {name: signal.getsignal(getattr(signal, name)) for name in EARLY_SIGNALS}
    try:  # launch installs its early preemption handlers first; they must not outlive this test
        code = main(["launch", *args, script])
    finally:
        for name, handler in saved.items():
            signal.signal(getattr(signal, name), handler)
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and started == []
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftrain: error: "), err
    expected = {"bad_key": "checkpoint.evry_steps", "bad_value": "checkpoint.retention.keep_last",
                "renamed_and_new": "sets both checkpoint.keep_last and checkpoint.retention.keep_last",
                "missing_script": "nope.py", "unwritable_dir": "not writable"}[case]
    assert expected in lines[0]
