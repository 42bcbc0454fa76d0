"""Worker side: the objects a session checkpoints, and how their state goes into a checkpoint and back.

Each registered object is *replicated* (the same on every rank: written once in
total) or *per-rank* (loaders, samplers: written by each rank). Modules get two
extras (see ``trainable.py``): their frozen parameter names are recorded and
re-applied on restore, and with ``trainable_only`` their frozen weights are left
out and referenced by a fingerprint instead.

What this module adds to a manifest's ``meta`` (docs/FORMAT.md): ``replicated``,
``per_rank``, ``frozen``, ``trainable_only``, ``omitted``, ``base_fingerprint``.

Not thread-safe: used by the training thread of one session.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from ftrain import envvars
from ftrain.checkpoint import codec
from ftrain.checkpoint.format import REPLICATED, rank_key
from ftrain.checkpoint.manifest import Manifest
from ftrain.errors import FtrainError, StateMismatch
from ftrain.session import rng, sharding, trainable, validation
from ftrain.stateful import Stateful

log = logging.getLogger("ftrain")

RESERVED = frozenset({"rng"})


class Registry:
    def __init__(self) -> None:
        self.objects: dict[str, tuple[Stateful, bool]] = {}
        #: Per module: the frozen parameters that still hold the base's values (what trainable-only may omit).
        self._bases: dict[str, trainable.FrozenBase] = {}
        #: Digests of omitted parameters verified by prepare(), adopted as the base once loading succeeded.
        self._verified: dict[str, dict[str, str]] = {}
        #: Digests of the other frozen parameters as the script loaded them, taken by prepare() before loading:
        #: those the checkpoint does not change are base values too (the rest were trained: saved in full).
        self._preload: dict[str, dict[str, str]] = {}

    def add(self, key: str, obj: object, per_rank: bool | None) -> None:
        if not key or "/" in key or key in RESERVED:
            raise FtrainError(f"cannot register state under the name {key!r}: names must be non-empty, "
                              f"without '/', and not one of {sorted(RESERVED)}")
        if not isinstance(obj, Stateful):
            raise FtrainError(f"cannot register {key!r}: a {type(obj).__name__} has no state_dict()/"
                              "load_state_dict(); wrap plain values in ftrain.Counters")
        self.objects[key] = (obj, _default_per_rank(obj) if per_rank is None else per_rank)

    # ------------------------------------------------------------------- save
    def capture(self, trainable_only: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[str]]:
        """``(replicated, per_rank, meta, buffers)``: every object's state now, this rank's RNG, what meta records,
        and the tensor names (as the codec names them, ``replicated/model/bn.running_mean``) of the persistent
        buffers of replicated modules.

        Those buffers are the one part of a replicated module the ranks legitimately disagree on between steps:
        DDP broadcasts rank 0's at the start of each forward, then each rank updates its own from its batch
        (BatchNorm's running statistics). The checkpointer writes them from rank 0 (``snapshot.owners``).
        """
        replicated: dict[str, Any] = {}
        mine: dict[str, Any] = {"rng": rng.capture()}
        buffers: list[str] = []
        frozen_by: dict[str, list[str]] = {}
        omitted_by: dict[str, list[str]] = {}
        fingerprints: dict[str, str] = {}
        paired = sharding.owners(self.objects)
        for key, (obj, per_rank) in self.objects.items():
            state = self._state(key, obj, paired)
            if trainable.is_module(obj):
                if not per_rank:  # persistent buffers only: those are the ones in the state dict
                    buffers += [f"{REPLICATED}/{key}/{n}" for n, _ in obj.named_buffers(remove_duplicate=False)
                                if n in state]
                frozen = trainable.frozen_names(obj)
                frozen_by[key] = frozen
                if trainable_only and frozen and sharding.is_sharded_module(obj):
                    raise FtrainError(f"checkpoint.trainable_only does not support sharded (FSDP2/DTensor) module "
                                      f"{key!r} yet; set checkpoint.trainable_only: false")
                if trainable_only and frozen:
                    base = self._base(key, obj)
                    digests = base.unchanged(obj, frozen)
                    state, omitted = trainable.split_state(state, digests)
                    if omitted:
                        omitted_by[key] = omitted
                        fingerprints[key] = trainable.combine(obj, {n: digests[n] for n in omitted})
            (mine if per_rank else replicated)[key] = state
        meta: dict[str, Any] = {
            "replicated": sorted(replicated), "per_rank": sorted(set(mine) - RESERVED), "frozen": frozen_by,
            "trainable_only": trainable_only, "omitted": omitted_by, "base_fingerprint": fingerprints,
        }
        return replicated, mine, meta, sorted(buffers)

    def _state(self, key: str, obj: Stateful, paired: dict[str, str]) -> Any:
        """An object's state as saved: torch's FSDP-aware state dicts for sharded modules and their optimizers."""
        if key in paired:
            model = self.objects[paired[key]][0]
            assert isinstance(model, torch.nn.Module) and isinstance(obj, torch.optim.Optimizer)
            return sharding.optimizer_state(model, obj)
        if sharding.is_sharded_module(obj):
            assert isinstance(obj, torch.nn.Module)
            return sharding.model_state(obj)
        return obj.state_dict()

    def _paired_modules(self, replicated: Any = None) -> dict[str, torch.nn.Module]:
        """Each optimizer whose state is keyed by parameter name -> its module: the sharded ones, and on restore
        (``replicated``: the decoded tree) those the checkpoint saved that way."""
        out: dict[str, torch.nn.Module] = {}
        for key, owner in sharding.owners(self.objects, sharding.named_in(replicated)).items():
            model = self.objects[owner][0]
            assert isinstance(model, torch.nn.Module)
            out[key] = model
        return out

    def targets(self, prefix: str) -> dict[str, tuple[torch.Tensor, bool]]:
        """Where restored tensors may go, by the name the codec gives them under ``prefix`` (the replicated tree):
        ``(tensor, True)`` is a registered module's own tensor, read into in place; ``(template, False)`` a
        sharded parameter that an optimizer's state of that name is laid out like (a fresh tensor is made from it).

        Optimizer state is never read in place: loading it is undone by loading the previous state, which must
        still hold the old values.
        """
        paired = sharding.owners(self.objects)
        out: dict[str, tuple[torch.Tensor, bool]] = {}
        for key, (obj, per_rank) in self.objects.items():
            if per_rank:
                continue
            if trainable.is_module(obj):
                _, table = codec.encode_objects({key: self._state(key, obj, paired)}, prefix)
                out.update((n, (t, True)) for n, t in table.items())
            elif key in paired:
                model = self.objects[paired[key]][0]
                assert isinstance(model, torch.nn.Module)
                out.update((n, (t, False)) for n, t in sharding.templates(model, f"{prefix}/{key}").items())
        return out

    def _base(self, key: str, obj: Any) -> trainable.FrozenBase:
        if key not in self._bases:  # no restore() ran (or it found nothing): the base is what is frozen now
            self.establish(None, trainable_only=True)
        return self._bases[key]

    def establish(self, manifest: Manifest | None, *, trainable_only: bool) -> None:
        """After a restore: fix each module's base, the frozen values trainable-only saves may leave out.

        A fresh run's base is every parameter frozen now. A resumed run's base is
        what its checkpoint omitted (just verified by fingerprint), plus the
        frozen parameters whose loaded values equal what the script had loaded
        before (a parameter trained in an earlier stage differs: it stays in
        every save, since its values exist nowhere else).
        """
        if trainable_only:
            for key, (obj, _) in self.objects.items():
                if not trainable.is_module(obj) or key in self._bases:
                    continue
                base = self._bases[key] = trainable.FrozenBase()
                if manifest is None:
                    base.adopt(obj, names=trainable.frozen_names(obj))
                    continue
                base.adopt(obj, digests=self._verified.get(key))
                base.adopt_if_unchanged(obj, self._preload.get(key, {}))
        self._verified.clear()
        self._preload.clear()

    # ---------------------------------------------------------------- restore
    def check(self, manifest: Manifest, trees: dict[str, Any] | None, rank: int, world_size: int,
              trainable_only: bool, on_resize: str = "refuse") -> None:
        """Refuse a checkpoint this run cannot take, touching nothing (see ``validation.py`` for the verdicts).

        ``trees`` None: the manifest's layout only (the same on every rank),
        including whether a checkpoint of another world size may load
        (``on_resize`` "resume" or "refuse", already resolved). Otherwise the
        decoded trees, tensors as descriptions: every registered object's
        state, each source rank's RNG state, the saved freezing and, for
        trainable-only checkpoints, the base weights' fingerprint.
        """
        what = f"step {manifest.step}"
        if trees is None:
            self._check_layout(manifest, world_size, on_resize)
            return
        # meta's own shape (names, omitted within frozen, a fingerprint for each) was checked when the manifest was
        # parsed (manifest.check_meta); here only what the registered objects decide.
        frozen_by, omitted_by = manifest.name_table("frozen"), manifest.name_table("omitted")
        self._verified = {}
        fingerprints = manifest.meta.get("base_fingerprint") or {}
        for key, (obj, _) in self.objects.items():
            if not trainable.is_module(obj) or key not in frozen_by:
                continue
            about = f"registered module {key!r} (checkpoint step {manifest.step})"
            trainable.check_frozen_names(obj, frozen_by[key], about)
            if key in omitted_by:
                self._verified[key] = trainable.check_base(obj, omitted_by[key], fingerprints[key], about)
        # After the freezing and base checks: their messages say more about a trainable-only checkpoint.
        sources = [rank] if manifest.world_size == world_size else range(manifest.world_size)
        paired = self._paired_modules(trees[REPLICATED])
        for r in sources:  # after a resize, every saving rank's per-rank state feeds the hooks
            validation.check_objects(self.objects, trees[REPLICATED], trees[rank_key(r)], omitted_by, what,
                                     sharded=paired)

    def _check_layout(self, manifest: Manifest, world_size: int, on_resize: str) -> None:
        if manifest.world_size != world_size:
            if on_resize != "resume":
                raise StateMismatch(
                    f"checkpoint step {manifest.step} was written by {manifest.world_size} rank(s); this run has "
                    f"{world_size}. Relaunch with {manifest.world_size} processes, or set checkpoint.on_resize: "
                    "resume to continue at this world size (docs/multi-node.md: the data position and replicated "
                    "state carry over exactly, per-rank RNG streams are derived anew)")
            hookless = sorted(k for k, (o, per_rank) in self.objects.items()
                              if per_rank and not callable(getattr(o, "resize_state", None)))
            if hookless:
                raise StateMismatch(
                    f"checkpoint step {manifest.step} was written by {manifest.world_size} rank(s), this run has "
                    f"{world_size}, and per-rank object(s) {hookless} have no resize_state(states, world_size, rank) "
                    "hook to map the saved ranks' states onto this run's (docs/multi-node.md); add one, register "
                    "them as replicated, or relaunch with the original number of processes")
        replicated, per_rank = manifest.object_names()  # lists of names: checked when the manifest was parsed
        saved_rep = set(replicated)
        saved_all = saved_rep | set(per_rank)
        missing, new = sorted(saved_all - set(self.objects)), sorted(set(self.objects) - saved_all)
        moved = sorted(k for k, (_, p) in self.objects.items() if k in saved_all and (k in saved_rep) == p)
        if missing or new or moved:
            raise StateMismatch(f"checkpoint step {manifest.step} does not match the registered state (missing: "
                                f"{missing}, new: {new}, per_rank changed: {moved}); register the same objects, "
                                "with the same per_rank choices, as the run that saved it")

    def resized(self, manifest: Manifest, trees: dict[str, Any], world_size: int, rank: int) -> dict[str, Any]:
        """This rank's per-rank tree after a resize: each per-rank object's ``resize_state`` applied to every saving
        rank's state (in saving-rank order); ``rng`` is left out (a resized run derives its streams anew)."""
        old = [trees[rank_key(r)] for r in range(manifest.world_size)]
        return {key: obj.resize_state([t[key] for t in old], world_size, rank)  # type: ignore[attr-defined]
                for key, (obj, per_rank) in self.objects.items() if per_rank}

    def load_cheap(self, manifest: Manifest, replicated: dict[str, Any], mine: dict[str, Any],
                   *, collect_base: bool) -> Callable[[], None]:
        """Load what can be undone cheaply; return the undo. Raises (after undoing its own work) on failure.

        Phase one of a load, after :meth:`check` passed on every rank: frozen
        flags, optimizers (their ``load_state_dict`` replaces the state wholesale,
        so the old state dict is a complete undo) and every other non-module
        object (a deep copy of its state is the undo: schedulers, counters,
        loaders are small). Modules and RNG streams come in :meth:`load_rest`,
        once every rank got through this phase. With ``collect_base`` (a
        trainable-only run) the frozen parameters the checkpoint stores are
        digested as the script loaded them, for :meth:`establish`.
        """
        undo: list[Callable[[], object]] = []

        def undo_all() -> None:
            for fn in reversed(undo):
                fn()

        frozen_by, omitted_by = manifest.name_table("frozen"), manifest.name_table("omitted")
        named = self._paired_modules(replicated)
        self._preload = {}
        try:
            for key, (obj, per_rank) in self.objects.items():
                if trainable.is_module(obj):
                    if key in frozen_by:
                        flags = {n: p.requires_grad for n, p in obj.named_parameters(remove_duplicate=False)}
                        undo.append(functools.partial(trainable.set_requires_grad, obj, flags))
                        changed = trainable.apply_frozen(obj, frozen_by[key], f"registered module {key!r}")
                        if collect_base:
                            stored = set(frozen_by[key]) - set(omitted_by.get(key, ()))
                            self._preload[key] = trainable.digests(obj, stored)
                        if changed:
                            log.warning("registered module %r (checkpoint step %d): restored requires_grad as saved "
                                        "for %d parameter(s), e.g. %s (the checkpoint records which parameters "
                                        "were frozen)", key, manifest.step, len(changed), changed[:3])
                    continue
                if key in named:
                    continue  # loaded after its module in phase two (set_optimizer_state_dict)
                before = obj.state_dict()
                if not isinstance(obj, torch.optim.Optimizer):
                    before = copy.deepcopy(before)
                obj.load_state_dict((mine if per_rank else replicated)[key])
                undo.append(functools.partial(obj.load_state_dict, before))
        except BaseException:
            undo_all()
            raise
        return undo_all

    def load_rest(self, manifest: Manifest, replicated: dict[str, Any], mine: dict[str, Any],
                  include_rng: bool = True) -> None:
        """Phase two: the modules (checked key by key, shape and dtype, before), then the RNG streams, last."""
        omitted_by = manifest.name_table("omitted")
        for key, (obj, per_rank) in self.objects.items():
            if not trainable.is_module(obj):
                continue
            state = (mine if per_rank else replicated)[key]
            if sharding.is_sharded_module(obj):
                sharding.load(obj, None, state, None)
            elif key in omitted_by:
                trainable.load_partial(obj, state, omitted_by[key],
                                       f"registered module {key!r} (checkpoint step {manifest.step})")
            else:
                obj.load_state_dict(state)
        for key, model in self._paired_modules(replicated).items():  # after their modules: keyed by their names
            opt = self.objects[key][0]
            assert isinstance(opt, torch.optim.Optimizer)
            sharding.load(model, opt, None, replicated[key])
        if include_rng:
            rng.restore(mine["rng"])  # last: loading other state must not disturb the restored streams


def resize_mode(setting: str) -> str:
    """``checkpoint.on_resize`` resolved: "auto" resumes under an elastic ``ftrain launch --nnodes MIN:MAX`` (it
    sets FTRAIN_ELASTIC for its workers), else refuses."""
    if setting != "auto":
        return setting
    return "resume" if os.environ.get(envvars.ELASTIC) == "1" else "refuse"


def _default_per_rank(obj: object) -> bool:
    from ftrain.data import ResumableLoader, ResumableSampler

    return isinstance(obj, (ResumableLoader, ResumableSampler))
