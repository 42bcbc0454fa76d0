"""The fault-injection hook must be exact: a typo is an error, never a fault firing everywhere or nowhere."""
from __future__ import annotations

import pytest

from ftrain import faults
from ftrain.errors import ConfigError


def test_parse_specs():
    got = faults.parse("kill@save.mid_write:step=20:rank=1, hang@step")
    assert [(f.action, f.point, f.step, f.rank) for f in got] == [("kill", "save.mid_write", 20, 1),
                                                                  ("hang", "step", None, None)]
    assert faults.parse("") == ()


@pytest.mark.parametrize("spec", ["kill@step:3", "kill@step:stepp=3", "kill@sav.begin", "explode@step",
                                  "kill", "kill@step:step=x"])
def test_bad_specs_are_errors(spec):
    with pytest.raises(ConfigError, match="bad FTRAIN_FAULTS spec"):
        faults.parse(spec)
