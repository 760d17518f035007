"""The import rules between the package's parts: the client speaks the wire protocol only
(requests, click and the pure core, never the server's frameworks or internals), the TEE worker
has no database, the pure core imports none of them, and a warm `agentkeys credentials` imports
neither boto3 nor requests. Server modules are found from the source, so new ones are covered."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.util import resolve_name
from pathlib import Path

import pytest

from agentkeys.client.cache import Home, credentials_name
from agentkeys.client.credentials import Credentials
from tests.live import ROOT, clean_env

PACKAGE = ROOT / "agentkeys"
SERVER_LIBRARIES = {"flask", "werkzeug", "sqlalchemy", "alembic", "psycopg", "marshmallow"}
SERVER_LIBRARIES |= {"gunicorn", "gevent", "redis"}
DATABASE_LIBRARIES = {"sqlalchemy", "alembic", "psycopg"}
CORE = (
    "agentkeys.crypto",
    "agentkeys.siwe",
    "agentkeys.identity",
    "agentkeys.settings",
    "agentkeys.attestation",
)
SHARED = {*CORE, "agentkeys.errors"}  # what the client may import from outside its package
HEAVY = {"boto3", "botocore", "requests", "urllib3"}
ROLE = "arn:aws:iam::123456789012:role/agentkeys-agent"
BROKER = "http://127.0.0.1:9"  # never contacted: the warm path reads the cache only


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(under: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(under.rglob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(node: ast.AST, with_typing: bool) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(node):
        if not with_typing and isinstance(child, ast.If) and _type_checking(child):
            for other in child.orelse:
                yield other
                yield from _nodes(other, with_typing)
            continue
        yield child
        yield from _nodes(child, with_typing)


def imported(
    source: str, name: str, is_package: bool = False, with_typing: bool = True
) -> set[str]:
    """Every module `source` names in an import, in function bodies too (a lazy import still
    runs); `with_typing=False` leaves out `if TYPE_CHECKING:` blocks, which never run."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _nodes(ast.parse(source), with_typing):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = resolve_name("." * node.level + (node.module or ""), package)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def imports_of(path: Path, with_typing: bool = True) -> set[str]:
    name = module_name(path)
    return imported(path.read_text(), name, path.name == "__init__.py", with_typing)


def within(name: str, prefixes: set[str] | tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# What each module imports when it runs. The package root is left out: it imports the factory
# only inside `create_app` (for `flask --app`), and importing it loads nothing (checked below).
GRAPH = {
    name: imports_of(path, with_typing=False)
    for name, path in modules().items()
    if name != "agentkeys"
}


def server_modules(libraries: set[str], *, blueprints: bool = True) -> set[str]:
    """Every agentkeys module that imports one of `libraries`, or a module that does, at any
    depth; and (unless told not to) the blueprints, whatever they import."""
    found = {name for name in GRAPH if blueprints and within(name, ("agentkeys.blueprints",))}
    found |= {name for name, names in GRAPH.items() if any(within(n, libraries) for n in names)}
    while more := {name for name, names in GRAPH.items() if names & found} - found:
        found |= more
    return found


SERVER = server_modules(SERVER_LIBRARIES)


def forbidden_in_client(name: str) -> bool:
    if within(name, SERVER_LIBRARIES) or name in SERVER:
        return True
    # Outside its own package the client takes only the shared core (and the cheap root).
    outside = within(name, ("agentkeys",)) and name != "agentkeys"
    return outside and not within(name, ("agentkeys.client", *SHARED))


def client_violations(source: str, name: str, is_package: bool = False) -> list[str]:
    """What a client module imports that the rules forbid."""
    return sorted(n for n in imported(source, name, is_package) if forbidden_in_client(n))


def leaked_on_import(names: list[str], forbidden: set[str]) -> list[str]:
    """The forbidden modules in sys.modules after a fresh interpreter imports `names`."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"forbidden = {sorted(forbidden)!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m in forbidden\n"
        "    or any(m.startswith(f + '.') for f in forbidden))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    leaked: list[str] = json.loads(result.stdout)
    return leaked


def test_server_modules_are_found_from_the_source() -> None:
    """The derived list holds the server's internals and none of the core or the client."""
    expected = {
        "agentkeys.broker.db",
        "agentkeys.broker.store",
        "agentkeys.broker.factory",
        "agentkeys.broker.services",
    }
    expected |= {"agentkeys.blueprints.http", "agentkeys.broker.keys", "agentkeys.broker.wallet"}
    assert expected <= SERVER
    assert not SERVER & {*SHARED, "agentkeys"}
    assert not {n for n in SERVER if within(n, ("agentkeys.client",))}


def test_client_imports_nothing_of_the_server() -> None:
    found = {
        str(path.relative_to(ROOT)): client_violations(
            path.read_text(), name, path.name == "__init__.py"
        )
        for name, path in modules(PACKAGE / "client").items()
    }
    assert {path: names for path, names in found.items() if names} == {}
    assert len(found) >= 8  # the check did look at the client


@pytest.mark.parametrize(
    "source",
    [
        "import flask",
        "from sqlalchemy import select",
        "def lazy():\n    from agentkeys.broker.store import IdentityLinkStore",
        "from agentkeys.blueprints import auth",
        "from agentkeys.broker import factory",
        "from . import http\nfrom .. import services",
        "from agentkeys.broker.mail import build_sign_in_mail",  # a broker internal, no framework
        "from agentkeys import create_app",
    ],
)
def test_the_client_check_catches(source: str) -> None:
    assert client_violations(source, "agentkeys.client.flow")


def test_the_client_check_allows_the_core() -> None:
    source = "from agentkeys import errors\nfrom agentkeys.crypto import omni\nfrom . import http"
    assert client_violations(source, "agentkeys.client.flow") == []


def test_client_modules_load_nothing_of_the_server() -> None:
    names = ["agentkeys", *sorted(modules(PACKAGE / "client"))]
    forbidden = SERVER_LIBRARIES | SERVER | {"agentkeys.blueprints", "agentkeys.tee"}
    assert leaked_on_import(names, forbidden) == []


def test_the_core_imports_none_of_the_parts() -> None:
    """The core's own imports, followed through every agentkeys module they reach."""
    parts = ("agentkeys.client", "agentkeys.blueprints", "agentkeys.tee")
    libraries = SERVER_LIBRARIES | {"requests", "boto3", "botocore", "click"}
    reached: set[str] = set()
    todo = list(CORE)
    while todo:
        name = todo.pop()
        if name in reached or name not in GRAPH:
            continue
        reached.add(name)
        todo += [n for n in GRAPH[name] if within(n, ("agentkeys",))]
        bad = {n for n in GRAPH[name] if within(n, parts) or n in SERVER or within(n, libraries)}
        assert not bad, f"{name} imports {sorted(bad)}"
    assert set(CORE) <= reached
    assert leaked_on_import(list(CORE), libraries | SERVER | set(parts)) == []


def test_the_tee_worker_has_no_database() -> None:
    """Its own app factory (Flask is fine, and the signer surface it shares with /dev) but no
    database, no broker internals, no client."""
    found = modules(PACKAGE / "tee")
    assert {"agentkeys.tee.app", "agentkeys.tee.state", "agentkeys.tee.sessions"} <= set(found)
    database = server_modules(DATABASE_LIBRARIES, blueprints=False)
    assert {
        "agentkeys.blueprints.http",
        "agentkeys.broker.services",
        "agentkeys.broker.keys",
    } <= database
    forbidden = ("agentkeys.client", "agentkeys.broker.factory", "agentkeys.broker.dev_key_service")
    for name, path in found.items():
        bad = {
            n
            for n in imports_of(path)
            if within(n, DATABASE_LIBRARIES) or n in database or within(n, forbidden)
        }
        assert not bad, f"{name} imports {sorted(bad)}"
    entry_points = ["agentkeys.tee.app", "agentkeys.tee.__main__"]
    assert leaked_on_import(entry_points, DATABASE_LIBRARIES | database) == []


def importtime(command: list[str], env: dict[str, str]) -> tuple[str, set[str]]:
    """stdout and the top-level packages the command imported (PYTHONPROFILEIMPORTTIME)."""
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=env | {"PYTHONPROFILEIMPORTTIME": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert lines, result.stderr  # the profile ran, so an empty set below means something
    names = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines}
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode in (0, 3), "\n".join(errors)
    return result.stdout, names


AGENTKEYS_COMMANDS = {
    "module": [sys.executable, "-m", "agentkeys.client.cli"],
    "console script": [str(Path(sys.executable).with_name("agentkeys"))],
}


@pytest.mark.parametrize("how", AGENTKEYS_COMMANDS)
def test_help_and_warm_credentials_import_no_boto3_nor_requests(how: str, tmp_path: Path) -> None:
    command = AGENTKEYS_COMMANDS[how]
    home = tmp_path / "home"
    stored = Credentials("ASIAWARMCACHE0000001", "s" * 40, "t" * 200, int(time.time()) + 3600)
    Home(home).write(credentials_name(BROKER, ROLE, 3600), stored.to_json())
    env = clean_env(AGENTKEYS_HOME=str(home), AGENTKEYS_ROLE_ARN=ROLE, AGENTKEYS_BROKER_URL=BROKER)

    out, names = importtime([*command, "--help"], env)
    assert "credentials" in out
    assert not names & (HEAVY | SERVER_LIBRARIES)

    out, names = importtime([*command, "credentials"], env)
    assert json.loads(out)["AccessKeyId"] == stored.access_key_id  # the cache was hit
    assert not names & (HEAVY | SERVER_LIBRARIES)

    # The control: with nothing cached the command reaches for the flow, and the profile shows it.
    (home / credentials_name(BROKER, ROLE, 3600)).unlink()
    out, names = importtime([*command, "credentials"], env)
    assert out == "" and {"requests", "urllib3"} <= names
