"""Names of every environment variable ftrain reads or sets (the environment contract).

Configuration keys are also read from ``FTRAIN_<SECTION>_<KEY>`` (see ``config.py``);
the names below are the others. Documented in README.md ("Environment").
"""
from __future__ import annotations

#: Path of a YAML config file to load.
CONFIG = "FTRAIN_CONFIG"
#: Fault-injection specs (tests and drills only; see ``faults.py``).
FAULTS = "FTRAIN_FAULTS"
#: Directory of "already fired" markers so each injected fault fires once across restarts.
FAULTS_ONCE_DIR = "FTRAIN_FAULTS_ONCE_DIR"

# Set by torchrun for each worker; read, never written, by ftrain.
RANK = "RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_RANK = "LOCAL_RANK"
