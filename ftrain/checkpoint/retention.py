"""Storage leaf: what stays in a checkpoint root: retention after each commit, and quarantine of damaged
checkpoints (docs/FORMAT.md, "Checkpoint root" and "Quarantine").

Retention keeps the ``keep_last`` newest checkpoints that pass the cheap checks
restore proposes a checkpoint after (the manifest parses, ``meta`` included, and
the files this root must hold have their sizes), and every protected one (the
best ones, the one just committed, uploads in flight, the newest safe one). A
checkpoint that fails never counts, whatever its step: damaged ones above the
steps a run saves (it resumed below them) cannot push its good ones out. A step
that is not kept is

* deleted if it is older than every kept one, valid or not;
* quarantined (``damaged-step-N``) if it is damaged as a whole here and newer
  (:attr:`CheckpointInfo.damaged`: never a part of a checkpoint saved to
  several disks, whose files may be the only copies);
* otherwise left alone (a part that fails here, newer than the oldest kept).

Quarantined directories older than every kept checkpoint are deleted too:
retention would have deleted them as checkpoints. Restore and ``ftrain ckpt
verify --quarantine`` quarantine what they find damaged, so a damaged
checkpoint the cheap checks cannot see (a flipped byte, ill-typed state) does
not count either once anything has read it.

Concurrency: called by a disk's leader after the job commit, holding the lease
(``CheckpointStore``'s contract), or by a tool holding it.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftrain.checkpoint import format
from ftrain.checkpoint.remote import RemotePath

if TYPE_CHECKING:  # the store calls in here: a type only
    from ftrain.checkpoint.store import CheckpointStore

log = logging.getLogger("ftrain.checkpoint")


@dataclass(frozen=True)
class Quarantined:
    """A directory set aside as damaged."""

    step: int
    name: str
    #: Who set it aside, when and why (its ``quarantined.txt``); "" if unreadable.
    note: str


def retain(store: CheckpointStore, step: int, keep_last: int, best: Iterable[int],
           protect: Iterable[int] = ()) -> list[int]:
    """After committing ``step``: point ``best`` at the best one, then :func:`prune`; returns the pruned steps.

    ``best`` lists the steps retention must keep as best ones, best first; ``protect`` other steps it must keep.
    A best step with no directory (its save failed, or it was quarantined) is neither protected nor pointed to.
    The pointer is written before pruning, like the commit's other pointers, and never left naming a pruned step.
    """
    kept_best = [s for s in best if s == step or store.has(s)]
    store.update_best_hint(kept_best[0] if kept_best else None)
    pruned = prune(store, keep_last, protect={step, *kept_best, *protect})
    if pruned and not kept_best:  # a pointer left from an earlier ranking may name a step just pruned
        store.update_best_hint(None)
    return pruned


def prune(store: CheckpointStore, keep_last: int, protect: set[int]) -> list[int]:
    """Delete the checkpoints beyond the newest ``keep_last`` intact ones (0 keeps all), never those in
    ``protect``, and quarantine the damaged ones among those kept (see the module docstring). Returns the
    steps deleted."""
    if keep_last <= 0:
        return []
    steps = store.steps()
    verdicts = {s: store.assess(s) for s in steps if s not in protect}
    good = [s for s in steps if s in protect or verdicts[s].valid]
    kept = set(good[-keep_last:]) | protect
    oldest = min(kept, default=0)
    doomed = [s for s in steps if s not in kept and (s in good or s < oldest)]
    for s in doomed:
        store.discard(format.step_dirname(s))
    for s in steps:
        if s not in good and s > oldest and verdicts[s].damaged:
            quarantine(store, s, f"retention: {verdicts[s].reason}")
    for q in quarantined(store):
        if q.step < oldest:
            store.discard(q.name)
    return doomed


def quarantine(store: CheckpointStore, step: int, why: str) -> str | None:
    """Set checkpoint ``step`` aside as damaged: rename it ``damaged-step-N`` (``-2``, ``-3``, ... if taken), out of
    discovery, restore and retention's count, then record ``why`` in it (``quarantined.txt``). Returns the new
    name; None if it stayed (a remote root, whose copies are the uploader's to manage; the directory gone, or the
    rename refused). The caller decides what is damage (:attr:`CheckpointInfo.damaged`, or restore's verdict)
    and holds the root's lease."""
    if isinstance(store.root, RemotePath):
        return None
    taken = {e.name for e in store.storage.list()}
    new = next(n for i in itertools.count(1) if (n := format.quarantine_dirname(step, i)) not in taken)
    try:
        store.storage.commit(format.step_dirname(step), new)
    except OSError as e:
        log.warning("could not set aside damaged checkpoint %s: %s", store.path(step), e.strerror or e)
        return None
    note = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {why}"[:format.MAX_POINTER_BYTES - 1]
    try:
        store.storage.write(f"{new}/{format.QUARANTINE_NOTE}", f"{note}\n".encode(errors="replace"))
    except OSError:  # the rename is what matters; the note only helps a human
        pass
    log.warning("set aside damaged checkpoint %s as %s: %s", store.path(step), new, why)
    return new


def quarantined(store: CheckpointStore) -> list[Quarantined]:
    """The directories of ``store`` set aside as damaged, by step."""
    out = []
    for entry in store.storage.list():
        step = format.parse_quarantine_dirname(entry.name)
        if step is None or not entry.is_dir:
            continue
        try:
            note = store.storage.read(f"{entry.name}/{format.QUARANTINE_NOTE}", format.MAX_POINTER_BYTES)
        except OSError:
            note = b""
        out.append(Quarantined(step, entry.name, note.decode(errors="replace").strip()))
    return sorted(out, key=lambda q: (q.step, q.name))
