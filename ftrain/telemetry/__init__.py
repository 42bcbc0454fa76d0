"""Supervisor side (outside the training processes): what a run went through, read from its event log.

* ``live``: the state of a run now (``ftrain status``, the supervisor's progress line);
* ``timeline``: the run's history as intervals per attempt and node, each in one bucket (pure);
* ``advisor``: the checkpoint interval the measurements call for (Young/Daly, pure);
* ``plot``: the timeline as a picture (matplotlib, the ``ftrain[plot]`` extra).

None of these imports torch: the commands start fast on a login node.
"""
