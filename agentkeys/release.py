"""The `release` process: refuse a deploy whose configuration is invalid, then migrate the
database and create the first signing keys if there are none.

`python -m agentkeys.release` exits 0 when done, 1 with one line naming the offending variable
(or the database failure) otherwise.
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy.exc import SQLAlchemyError

from agentkeys.broker.keys import KEK, KeyUnsealError
from agentkeys.broker.migrate import upgrade
from agentkeys.broker.services import Services
from agentkeys.errors import ConfigError
from agentkeys.settings import Settings

USAGE = f"""\
Validate the configuration from the environment (AGENTKEYS_ENV defaults to production; see
README.md, Configuration), run the database migrations, create the first signing keys if there
are none, and seal any key stored unsealed once {KEK} is set.

Exits 0 when done, 1 with one line naming the offending variable or the database failure."""


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m agentkeys.release",
        description=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)
    try:
        settings = Settings.from_env()
        services = Services.build(settings)  # a malformed database or Redis URL fails here
    except ConfigError as exc:
        print(f"agentkeys: configuration error: {exc.detail}", file=sys.stderr)
        return 1
    print(f"agentkeys: configuration ok (AGENTKEYS_ENV={settings.env})")
    try:
        upgrade(services.engine, settings.client_id)
        for ring in services.keyrings():
            ring.ensure_initial()
        sealed = sum(ring.seal_unsealed() for ring in services.keyrings())
    except SQLAlchemyError as exc:
        print(f"agentkeys: database error: {type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyUnsealError as exc:
        print(f"agentkeys: {exc}", file=sys.stderr)
        return 1
    finally:
        services.engine.dispose()
    if sealed:
        print(f"agentkeys: sealed {sealed} signing keys stored unsealed, under {KEK}")
    print("agentkeys: database migrated; signing keys present")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
