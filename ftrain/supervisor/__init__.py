"""Supervisor side (beside torchrun, outside the training processes): the supervisor behind ``ftrain launch``.

It restarts failed or hung jobs and handles preemption. Modules: ``supervisor``
(its states, signals and the zygote), ``watch`` (its one loop over a running torchrun), ``groups`` (the mode of
every launch: one torchrun that restarts its worker groups, each judged by the policy), ``job`` (the job
interface and the real torchrun process tree), ``command`` (torchrun's command line, pure),
``policy`` (the restart decision, pure), ``hang`` (hang detection, pure),
``report`` (root cause), ``membership`` (why a worker group ended: membership change or local
failure, pure), ``stop`` (what asked the launch to stop: a signal or a notice); for
warm starts, ``zygote`` (the forkserver that imports torch once and forks the
workers, and its handle), ``zygote_preload``, ``zygote_protocol``, ``entry`` (what torchrun starts per rank)
and ``warm_worker`` (the forked child becoming ``python script.py``).
"""
