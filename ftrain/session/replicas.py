"""Worker side: copies of each disk's checkpoint files on other nodes' disks (``checkpoint.replicas``).

With node-local checkpoint directories a node's loss takes its disk with it. As part of each commit
(``commit.py``), every disk's leader sends its own ranks' files of the step to the ``replicas`` disks after
it in the job's disk order (``assembly.replica_rounds``), so no disk's loss takes a file and all its copies;
a restore then fetches a lost disk's files from a peer (``sources.py``). The copies go into the receiving
disk's ``step-N/``, verified against the manifest's checksums before they are renamed in (``peers.py``).

It runs in the leaders' background writers, all on the same step at the same time (they exchange files
pairwise, round by round: each sends to one disk while it receives from another), over a gloo group of their
own, never the training one. Not thread-safe: one writer per leader.
"""
from __future__ import annotations

from ftrain.checkpoint import assembly, format
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.storage import LocalStorage
from ftrain.session.layout import Layout
from ftrain.session.peers import FileMove, Peers

#: The store key holding the newest step that one disk's loss cannot take (replicated, or on the remote tier):
#: retention never deletes it (``checkpointer.py``).
SAFE_KEY = "safe"


class Replicas:
    def __init__(self, layout: Layout, peers: Peers, local: LocalStorage, replicas: int) -> None:
        self.layout, self.peers, self.local = layout, peers, local
        self.rounds = assembly.replica_rounds(layout.order, replicas)

    def copy(self, step: int, manifest: Manifest) -> list[str]:
        """Every round's exchange for this leader's disk; the received files that did not arrive intact."""
        ckpt = format.step_dirname(step)
        me = self.layout.my_disk
        failed: list[str] = []

        def moves(disk: str) -> list[FileMove]:
            return [FileMove(f"{ckpt}/{n}", manifest.files[n]) for n in sorted(manifest.primary_files(disk))]

        for pairs in self.rounds:
            to = next(dst for src, dst in pairs if src == me)
            source = next(src for src, dst in pairs if dst == me)
            failed += self.peers.swap(self.local, send=moves(me), to=self.layout.leader(to), receive=moves(source),
                                      source=self.layout.leader(source))
        return failed
