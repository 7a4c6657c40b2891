from __future__ import annotations


class DemoDataError(Exception):
    """Raised when demo data cannot be generated or changed (bad arguments, missing tables)."""
