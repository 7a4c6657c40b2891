"""Entry point for `python -m include.copy_engine`."""

from __future__ import annotations

import sys

from ._cli import main

sys.exit(main())
