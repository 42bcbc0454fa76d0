"""``python -m ftrain`` is the ``ftrain`` command."""
from __future__ import annotations

import sys

from ftrain.cli import main

sys.exit(main())
