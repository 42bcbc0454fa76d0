"""A Session's process-global hooks are undone by close(), and a second Session in the same process works."""
from __future__ import annotations

import atexit
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ftrain
from ftrain.checkpoint import lease
from ftrain.config import CheckpointConfig, FtrainConfig
from ftrain.session import teardown


def make_session(root: Path) -> tuple[ftrain.Session, torch.nn.Module]:
    model = torch.nn.Linear(3, 2)
    session = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir=str(root), every_steps=2)))
    session.register(model=model)
    return session, model


class ExitCallbacks:
    """Watches atexit (which cannot be listed): what was registered and not unregistered since."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live: list[Callable[[], object]] = []
        register, unregister = atexit.register, atexit.unregister

        def on_register(fn: Callable[[], object]) -> Callable[[], object]:
            self.live.append(fn)
            return register(fn)

        def on_unregister(fn: Callable[[], object]) -> None:
            self.live = [f for f in self.live if f != fn]
            unregister(fn)

        monkeypatch.setattr(atexit, "register", on_register)
        monkeypatch.setattr(atexit, "unregister", on_unregister)

    @property
    def session_hooks(self) -> list[Callable[[], object]]:
        """What is registered besides the process-wide hooks, which are registered once and stay by design: the
        exit teardown (session/teardown.py) and the leases' release (checkpoint/lease.py)."""
        return [f for f in self.live if f not in (teardown._at_exit, lease._release_all)]


def test_close_undoes_every_hook_and_a_second_session_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hook_before = sys.excepthook
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    exits = ExitCallbacks(monkeypatch)

    session, model = make_session(tmp_path)
    assert sys.excepthook is not hook_before
    assert all(signal.getsignal(s) is not h for s, h in handlers_before.items())
    assert exits.session_hooks == [session._flush_at_exit]
    assert session.restore() == 0
    for step in range(1, 5):
        session.step(step)
    session.close()

    assert sys.excepthook is hook_before
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before
    assert exits.session_hooks == []

    # A second session in the same process resumes from the first one's checkpoint and saves again.
    second, model2 = make_session(tmp_path)
    assert exits.session_hooks == [second._flush_at_exit]
    assert second.restore() == 4
    assert torch.equal(model2.weight, model.weight)
    second.step(6)
    second.close()
    assert second._store.steps()[-1] == 6
    assert sys.excepthook is hook_before
    assert exits.session_hooks == []
    assert exits.live.count(teardown._at_exit) <= 1  # once per process, however many sessions


def test_a_signal_after_close_is_not_taken_for_a_preemption(tmp_path: Path) -> None:
    session, _ = make_session(tmp_path)
    session.restore()
    session.close()
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # what a later owner of the signal installs
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert not session._liveness.preempt_requested
    finally:
        signal.signal(signal.SIGUSR1, previous)
