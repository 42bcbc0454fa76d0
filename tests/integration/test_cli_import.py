"""Importing ftrain.cli, checked in a fresh interpreter (this one has torch imported already)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT, child_env

pytestmark = pytest.mark.slow


def test_cli_import_stays_light():
    # `ftrain launch` builds the ckpt parsers too: registering export/inspect must not import torch or safetensors.
    code = "import sys, ftrain.cli; bad = {'torch', 'safetensors'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], env=child_env(), cwd=ROOT, check=True, timeout=60)
