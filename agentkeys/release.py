"""The `release` process: refuse a deploy whose configuration is invalid.

`python -m agentkeys.release` exits 0 after validating the environment, 1 with one line naming
the offending variable otherwise.
"""

from __future__ import annotations

import sys

from agentkeys.errors import ConfigError
from agentkeys.settings import Settings


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"agentkeys: configuration error: {exc.detail}", file=sys.stderr)
        return 1
    print(f"agentkeys: configuration ok (AGENTKEYS_ENV={settings.env})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
