"""Event kinds are one enum (``ftrain.events.Ev``): it matches docs/FORMAT.md's table, writers emit its members,
readers compare with its members, and a member is written as the plain string it always was.

Read off the source with ``ast`` (nothing is imported but ftrain.events), so a string literal where a kind belongs
fails here, naming the file and the line.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from ftrain.events import Ev, EventLog, log_path, read_events

ROOT = Path(__file__).resolve().parents[2]
KINDS = {k.value for k in Ev}


def test_the_enum_is_the_table_in_format_md() -> None:
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    lines = text[text.index("\nKinds ("):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| `ev` |"))  # the table's header row
    table = lines[start:lines.index("", start)]
    assert table[1].startswith("| ---")
    rows = table[2:]
    documented = {name for row in rows for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert documented == KINDS


def test_a_member_is_written_and_read_as_its_plain_string(tmp_path: Path) -> None:
    log = EventLog(log_path(tmp_path, "r"), run="r")
    log.emit(Ev.LAUNCH, nproc=2)
    log.close()
    [line] = log_path(tmp_path, "r").read_text().splitlines()
    assert json.loads(line)["ev"] == "launch" and '"ev":"launch"' in line  # the on-disk format is unchanged
    [event] = read_events(tmp_path)
    assert event["ev"] == Ev.LAUNCH and event["ev"] in {Ev.LAUNCH} and type(event["ev"]) is str
    assert str(Ev.LAUNCH) == f"{Ev.LAUNCH}" == "launch"


def _holds_a_kind(node: ast.expr) -> bool:
    """An expression holding an event's kind: ``e["ev"]``, ``e.get("ev")``, or a variable ``ev`` or ``kinds``."""
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "ev"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "ev"
    return isinstance(node, ast.Name) and node.id in ("ev", "kinds")


def _strings(node: ast.expr) -> list[str]:
    """The string constants ``node`` is, or holds as the elements of a tuple, list or set literal."""
    elements = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)]


def _is_member(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Ev"
            and node.attr in Ev.__members__)


def _misspelt_kinds(source: str) -> list[tuple[int, str]]:
    """(line, what) of every place in ``source`` that spells an event kind as a string literal."""
    bad: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_holds_a_kind(o) for o in operands):
                bad += [(node.lineno, f"compared with {s!r}") for o in operands for s in _strings(o)]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            first = node.args[0]
            forwarded = isinstance(first, ast.Name) and first.id == "ev"  # a wrapper passing its parameter on
            if name in ("emit", "_lead") and not (_is_member(first) or forwarded):
                bad.append((node.lineno, f"{name}({ast.unparse(first)}, ...)"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            # A collection of nothing but kinds (a set of kinds to keep, say) is meant to be compared with them.
            strings = _strings(node)
            if len(strings) >= 2 and len(strings) == len(node.elts) and set(strings) <= KINDS:
                bad.append((node.lineno, f"a collection of kinds {strings}"))
    return bad


def test_no_event_kind_is_a_string_literal_in_ftrain() -> None:
    bad = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in sorted((ROOT / "ftrain").rglob("*.py"))
           for line, what in _misspelt_kinds(path.read_text())]
    assert not bad, "use ftrain.events.Ev members for event kinds:\n" + "\n".join(bad)


def test_the_check_finds_each_way_of_spelling_a_kind() -> None:
    source = '''
log.emit("launch", nproc=2)
self._lead("save", step=1)
if e["ev"] == "committed": pass
if ev in ("signal", "notice"): pass
if e.get("ev") != "hang": pass
if "first_step" in kinds: pass
keep = {"launch", "group_end"}
'''
    assert sorted({line for line, _ in _misspelt_kinds(source)}) == [2, 3, 4, 5, 6, 7, 8]
    fine = '''
log.emit(Ev.LAUNCH, nproc=2)
self.log.emit(ev, **fields)
if e["ev"] == Ev.COMMITTED and e.get("ending") == "membership change": pass
if ev in (Ev.SIGNAL, Ev.NOTICE): pass
BUCKETS = ("productive", "save", "hang")
'''
    assert _misspelt_kinds(fine) == []
