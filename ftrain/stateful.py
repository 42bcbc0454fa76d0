"""Shared contract: the ``Stateful`` protocol, and a small stateful holder for plain counters."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ftrain.errors import StateMismatch


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()``/``load_state_dict()``: modules, optimizers, schedulers, GradScaler, loaders."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class Counters:
    """Named plain values (ints, floats, strings, lists) that are checkpointed with the run.

    ``c = Counters(epoch=0, tokens=0); c.tokens += n`` and register ``c``; a
    plain ``int`` cannot be restored in place, this can. Values must be JSON.
    """

    VERSION = 1

    def __init__(self, **values: Any) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._values[name] = value

    def __repr__(self) -> str:
        return f"Counters({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, "values": dict(self._values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.VERSION:
            raise StateMismatch(f"Counters: saved version {state.get('version')!r}, expected {self.VERSION}")
        self._values.clear()
        self._values.update(state["values"])
