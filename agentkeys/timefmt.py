"""RFC 3339 UTC strings for JSON bodies (§3: ending in Z)."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(seconds: int | float) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
