"""Deterministic demo source data: a securities master, an EDI 690 corporate-action feed and the
trading venues (reference data without a change timestamp, synced by change data capture).

`generate` creates (or replaces) the three source tables; `tick` applies one realistic batch of
changes at the source so that the next ingestion is incremental and the snapshots record history.
Rows are produced inside PostgreSQL from `generate_series` and md5-based pseudo-random numbers, so
the same seed always gives the same rows and millions of rows stay fast.
"""

from __future__ import annotations

from include.demo_data._errors import DemoDataError
from include.demo_data._exchanges import ensure_exchanges
from include.demo_data._generate import DEFAULT_EPOCH, generate
from include.demo_data._tick import tick

__all__ = ["DEFAULT_EPOCH", "DemoDataError", "ensure_exchanges", "generate", "tick"]
