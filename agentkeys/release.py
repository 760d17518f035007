"""The `release` process: refuse a deploy whose configuration is invalid, then migrate the
database and create the first signing keys if there are none.

`python -m agentkeys.release` exits 0 when done, 1 with one line naming the offending variable
(or the database failure) otherwise.
"""

from __future__ import annotations

import sys

from sqlalchemy.exc import SQLAlchemyError

from agentkeys.errors import ConfigError
from agentkeys.keys import KeyUnsealError
from agentkeys.migrate import upgrade
from agentkeys.services import Services
from agentkeys.settings import Settings


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"agentkeys: configuration error: {exc.detail}", file=sys.stderr)
        return 1
    print(f"agentkeys: configuration ok (AGENTKEYS_ENV={settings.env})")
    services = Services.build(settings)
    try:
        upgrade(services.engine)
        for ring in services.keyrings():
            ring.ensure_initial()
    except SQLAlchemyError as exc:
        print(f"agentkeys: database error: {type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyUnsealError as exc:
        print(f"agentkeys: {exc}", file=sys.stderr)
        return 1
    finally:
        services.engine.dispose()
    print("agentkeys: database migrated; signing keys present")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
