"""Time helpers: whole Unix seconds, and RFC 3339 UTC strings ending in Z (§3)."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def rfc3339(seconds: int | float) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_seconds() -> int:
    """The default clock of the stores: whole Unix seconds."""
    return int(time.time())
