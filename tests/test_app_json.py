"""app.json, the Heroku-style manifest, kept in step with the code: every variable the deployed
processes read from the environment is named there with its meaning, and nothing else is.

The names come from the source itself (ast): every `EnvReader` call and every `os.environ` /
`os.getenv` read in the broker, the worker and config/ (the `agentkeys` client on a laptop is not
deployed, so its variables are not the app's). A read the scanner cannot name fails the test."""

from __future__ import annotations

import ast
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import pytest

from agentkeys.errors import ConfigError
from agentkeys.settings import _PROVIDER_VAR, KEK_VAR, MASTER_SECRET_VAR, Settings
from agentkeys.tee.settings import WorkerSettings
from tests.live import ROOT

MANIFEST = ROOT / "app.json"
# Read by the code on purpose and kept out of app.json on purpose: production refuses it, so
# the manifest names it only to say so (see test_the_dev_master_secret_is_a_documented_absence).
ABSENT = {MASTER_SECRET_VAR}
# Values for the variables a deploy must supply, to start Settings the way the release step does.
SAMPLES = {
    "AGENTKEYS_ISSUER": "https://agentkeys.example.com",
    "AGENTKEYS_MAIL_URL": "smtps://mailer:secret@smtp.example.com:465",
    KEK_VAR: "ab" * 32,
    "DATABASE_URL": "postgres://user:secret@db.example.com:5432/keys",
}


def manifest() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(MANIFEST.read_text())
    return loaded


def deployed_sources() -> list[Path]:
    """The code that runs on the platform: the package minus the client, config/, the entry
    points and the migrations."""
    client = ROOT / "agentkeys" / "client"
    package = [p for p in (ROOT / "agentkeys").rglob("*.py") if client not in p.parents]
    others = [*(ROOT / "config").rglob("*.py"), *(ROOT / "migrations").rglob("*.py")]
    return sorted([*package, *others, ROOT / "app.py", ROOT / "wsgi.py"])


# --- the scanner ---------------------------------------------------------------------------


@dataclass
class Found:
    names: set[str] = field(default_factory=set)
    patterns: set[str] = field(default_factory=set)  # with <NAME> where the code fills a part in
    unreadable: list[str] = field(default_factory=list)  # file:line of reads it cannot name


def reader_methods() -> set[str]:
    """EnvReader's methods that read one variable: those whose first argument is its name."""
    tree = ast.parse((ROOT / "agentkeys" / "settings.py").read_text())
    [reader] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EnvReader"]
    return {
        f.name
        for f in reader.body
        if isinstance(f, ast.FunctionDef) and len(f.args.args) > 1 and f.args.args[1].arg == "name"
    }


def module_constants(tree: ast.Module) -> dict[str, str]:
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Constant):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    found[target.id] = node.value.value
    return found


def is_os_environ(node: ast.AST) -> TypeGuard[ast.Attribute]:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def scan(sources: dict[str, str], methods: set[str]) -> Found:
    """The variables `sources` (module name → text) read. Names given as constants are resolved
    in their module or through `from … import`; `prefix + "X"` with an f-string prefix becomes
    a pattern."""
    trees = {module: ast.parse(text) for module, text in sources.items()}
    constants = {module: module_constants(tree) for module, tree in trees.items()}
    found = Found()
    for module, tree in trees.items():
        if not re.search(r"environ|EnvReader|getenv", sources[module]):
            continue  # nothing here could read a variable (the scan below is the slow part)
        known = dict(constants[module])
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in constants:
                for alias in node.names:
                    if alias.name in constants[node.module]:
                        known[alias.asname or alias.name] = constants[node.module][alias.name]
        parents = {kid: node for node in ast.walk(tree) for kid in ast.iter_child_nodes(node)}
        bound: dict[ast.AST, tuple[set[str], dict[str, ast.JoinedStr]]] = {}
        for node in ast.walk(tree):
            if is_os_environ(node) and not _recognised(node, parents):
                found.unreadable.append(f"{module}:{node.lineno}: os.environ used another way")
            if not isinstance(node, ast.Call | ast.Subscript):
                continue
            scope = _scope_of(node, parents, tree)
            if scope not in bound:
                bound[scope] = _bindings(scope, parents)
            readers, fstrings = bound[scope]
            named = _read_name_argument(node, readers, methods)
            if named is not None and not _delegates(scope, parents, named):
                _name(named, module, known, fstrings, found)
    return found


def _scope_of(node: ast.AST, parents: dict[ast.AST, ast.AST], tree: ast.Module) -> ast.AST:
    """The function `node` is in, or the module."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef):
            return node
    return tree


def _in_env_reader(scope: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    owner = parents.get(scope)
    return isinstance(owner, ast.ClassDef) and owner.name == "EnvReader"


def _delegates(scope: ast.AST, parents: dict[ast.AST, ast.AST], named: ast.expr) -> bool:
    """EnvReader's own methods pass their `name` on (`self.optional(name)`): not a read."""
    return _in_env_reader(scope, parents) and isinstance(named, ast.Name) and named.id == "name"


def _bindings(
    scope: ast.AST, parents: dict[ast.AST, ast.AST]
) -> tuple[set[str], dict[str, ast.JoinedStr]]:
    """The names bound to an EnvReader in `scope` (assigned from `EnvReader(…)`, a parameter
    annotated EnvReader, `self` in EnvReader's own methods) and those bound to f-strings."""
    readers: set[str] = set()
    fstrings: dict[str, ast.JoinedStr] = {}
    if isinstance(scope, ast.FunctionDef):
        if _in_env_reader(scope, parents):
            readers.add("self")
        for arg in scope.args.args:
            if isinstance(arg.annotation, ast.Name) and arg.annotation.id == "EnvReader":
                readers.add(arg.arg)
    for node in ast.walk(scope):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        [target] = node.targets
        if not isinstance(target, ast.Name):
            continue
        value = node.value
        func = value.func if isinstance(value, ast.Call) else None
        if isinstance(func, ast.Name) and func.id == "EnvReader":
            readers.add(target.id)
        if isinstance(value, ast.JoinedStr):
            fstrings[target.id] = value
    return readers, fstrings


def _read_name_argument(
    node: ast.Call | ast.Subscript, readers: set[str], methods: set[str]
) -> ast.expr | None:
    """The expression naming the variable if `node` reads one: `env.text(NAME, …)`,
    `os.environ.get(NAME)`, `os.environ[NAME]`, `os.getenv(NAME)`."""
    if isinstance(node, ast.Subscript):
        return node.slice if is_os_environ(node.value) and isinstance(node.ctx, ast.Load) else None
    func = node.func
    if not isinstance(func, ast.Attribute) or not node.args:
        return None
    if isinstance(func.value, ast.Name) and func.value.id in readers and func.attr in methods:
        return node.args[0]
    if func.attr == "get" and is_os_environ(func.value):
        return node.args[0]
    if func.attr == "getenv" and isinstance(func.value, ast.Name) and func.value.id == "os":
        return node.args[0]
    return None


def _name(
    arg: ast.expr,
    module: str,
    known: dict[str, str],
    fstrings: dict[str, ast.JoinedStr],
    found: Found,
) -> None:
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        found.names.add(arg.value)
    elif isinstance(arg, ast.Name) and arg.id in known:
        found.names.add(known[arg.id])
    elif (
        isinstance(arg, ast.BinOp)
        and isinstance(arg.op, ast.Add)
        and isinstance(arg.left, ast.Name)
        and arg.left.id in fstrings
        and isinstance(arg.right, ast.Constant)
    ):
        found.patterns.add(_placeholders(fstrings[arg.left.id]) + str(arg.right.value))
    else:
        found.unreadable.append(f"{module}:{arg.lineno}: {ast.unparse(arg)}")


def _placeholders(text: ast.JoinedStr) -> str:
    """f"A_{name}_" as "A_<NAME>_"."""
    return "".join(
        f"<{ast.unparse(part.value).upper()}>"
        if isinstance(part, ast.FormattedValue)
        else str(ast.literal_eval(part))
        for part in text.values
    )


def _recognised(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """`os.environ` read by key, written by key, or handed whole to an EnvReader."""
    parent = parents.get(node)
    if isinstance(parent, ast.Subscript):
        return True
    if isinstance(parent, ast.Attribute) and parent.attr == "get":
        return True
    if isinstance(parent, ast.IfExp):  # EnvReader(os.environ if environ is None else environ)
        call = parents.get(parent)
        return (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == "EnvReader"
        )
    return False


@functools.cache
def code_reads() -> Found:
    sources = {}
    for path in deployed_sources():
        relative = path.relative_to(ROOT).with_suffix("")
        sources[".".join(relative.parts).removesuffix(".__init__")] = path.read_text()
    return scan(sources, reader_methods())


def as_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"<[A-Z_]+>", pattern)
    return re.compile("[A-Z0-9]+".join(map(re.escape, parts)))


# --- the scanner on its own ----------------------------------------------------------------


def test_the_scanner_finds_each_way_of_reading_and_flags_the_rest() -> None:
    settings = 'NAME_VAR = "FROM_CONSTANT"\n'
    other = """
import os
from pkg.settings import NAME_VAR
from agentkeys.settings import EnvReader

LOCAL = "LOCAL_CONSTANT"
PORT = os.environ.get("AT_IMPORT", "1")

def build(environ=None):
    env = EnvReader(os.environ if environ is None else environ)
    env.text("LITERAL", None)
    env.integer(NAME_VAR, 1, 0, 2)
    env.optional(LOCAL)
    prefix = f"P_{kind}_"
    env.optional(prefix + "SUFFIX")
    env.optional(compute())
    env.unrelated("NOT_A_READ")
    other.text("NOT_AN_ENV_READER")
    os.environ["SUBSCRIPT"] = "written"
    return os.environ["SUBSCRIPT_READ"], os.getenv("GETENV"), dict(os.environ)

def helper(env: EnvReader):
    return env.choice("ANNOTATED", ("a",), "a")
"""
    found = scan(
        {"pkg.settings": settings, "pkg.other": other}, {"text", "integer", "optional", "choice"}
    )
    assert found.names == {
        "AT_IMPORT",
        "LITERAL",
        "FROM_CONSTANT",
        "LOCAL_CONSTANT",
        "SUBSCRIPT_READ",
        "GETENV",
        "ANNOTATED",
    }
    assert found.patterns == {"P_<KIND>_SUFFIX"}
    assert found.unreadable == [
        "pkg.other:16: compute()",
        "pkg.other:20: os.environ used another way",
    ]


def test_the_scanner_reads_the_real_code() -> None:
    found = code_reads()
    assert found.unreadable == []
    assert reader_methods() >= {"optional", "text", "choice", "integer", "text_list", "int_list"}
    # A few of each source, so a scanner that found nothing could not pass the tests below.
    assert {
        "AGENTKEYS_ISSUER",
        KEK_VAR,
        MASTER_SECRET_VAR,
        "AGENTKEYS_RATE_LIMITS",
        "AGENTKEYS_TEE_RELEASE",
        "AGENTKEYS_TEE_RATE_LIMIT",
        "PORT",
        "WEB_CONCURRENCY",
        "AGENTKEYS_ACCESS_LOG",
    } <= found.names
    assert found.patterns == {
        "AGENTKEYS_OAUTH2_<NAME>_ISSUER",
        "AGENTKEYS_OAUTH2_<NAME>_CLIENT_ID",
        "AGENTKEYS_OAUTH2_<NAME>_CLIENT_SECRET",
    }


# --- app.json against the code -------------------------------------------------------------


def test_every_variable_the_code_reads_is_in_app_json_and_nothing_else() -> None:
    found, app = code_reads(), manifest()
    env = set(app["env"])
    from_addons = {addon["as"] + "_URL" for addon in app["addons"] if "as" in addon}
    assert sorted(found.names - env - from_addons - ABSENT) == [], "read but not in app.json"
    patterns = [as_regex(p) for p in found.patterns]
    extra = [k for k in env if k not in found.names and not any(p.fullmatch(k) for p in patterns)]
    assert sorted(extra) == [], "in app.json but read by no code"
    # An add-on sets its own variable: the code reads it, app.json must not set it as well.
    assert from_addons == {"DATABASE_URL"} and from_addons <= found.names
    assert not from_addons & env
    for pattern in sorted(found.patterns):
        examples = [k for k in env if as_regex(pattern).fullmatch(k)]
        assert examples, f"no example of {pattern} in app.json"
        for example in examples:
            assert _PROVIDER_VAR.match(example), example  # what Settings takes as a provider
            assert pattern in app["env"][example]["description"], example


def test_the_dev_master_secret_is_a_documented_absence() -> None:
    app, found = manifest(), code_reads()
    for name in ABSENT:
        assert name in found.names  # still read, so still worth saying
        assert name not in app["env"]
        assert name in app["env"]["AGENTKEYS_ENV"]["description"]


# --- app.json as a manifest ----------------------------------------------------------------


def procfile_types() -> set[str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {line.split(":", 1)[0] for line in lines if line.strip()}


def test_app_json_is_a_heroku_manifest() -> None:
    app = manifest()
    assert set(app) == {
        "name",
        "description",
        "keywords",
        "buildpacks",
        "formation",
        "addons",
        "env",
    }
    # The limits of the app.json schema: a name of 3 to 30 characters, a description of ≤ 140.
    assert 3 <= len(app["name"]) <= 30 and 0 < len(app["description"]) <= 140
    assert app["buildpacks"] == [{"url": "heroku/python"}]
    # Every process type but release (the release phase runs on each deploy by itself).
    assert set(app["formation"]) == procfile_types() - {"release"} == {"web", "tee"}
    for process in app["formation"].values():
        assert set(process) == {"quantity", "size"} and isinstance(process["quantity"], int)
    # The worker needs an AWS Nitro enclave (/dev/nsm): none on a dyno, and production refuses
    # the simulated platform.
    assert app["formation"]["tee"]["quantity"] == 0
    assert {"plan": "heroku-postgresql", "as": "DATABASE"} in app["addons"]
    assert [a for a in app["addons"] if a["plan"].startswith("heroku-redis")] == []
    for name, entry in app["env"].items():
        assert set(entry) <= {"description", "value", "required", "generator"}, name
        assert isinstance(entry["description"], str) and len(entry["description"]) > 20, name
        assert isinstance(entry["required"], bool), name
        assert isinstance(entry.get("value", ""), str), name
        # Heroku documents its generator only as "a pseudo-random string of characters": not
        # the 64 hex a key-encryption key must be, so no variable here is generated.
        assert "generator" not in entry, name


def base_environment() -> dict[str, str]:
    """What a deploy from app.json sets: its values, and a sample for each required one."""
    env = manifest()["env"]
    given = {name: entry["value"] for name, entry in env.items() if "value" in entry}
    needed = [name for name, entry in env.items() if entry["required"] and "value" not in entry]
    return {**given, **{name: SAMPLES[name] for name in [*needed, "DATABASE_URL"]}}


def test_app_json_values_start_the_broker_and_the_worker() -> None:
    settings = Settings.from_env(base_environment())
    assert settings.is_production and settings.trusted_proxies == 1
    worker_env = {
        **base_environment(),
        "AGENTKEYS_TEE_RELEASE": "agentkeys-1",
        "AGENTKEYS_SESSION_JWKS_URL": "https://agentkeys.example.com/v1/session-keys",
    }
    assert WorkerSettings.from_env(worker_env).platform == "nitro"


@pytest.mark.parametrize(
    "name",
    [
        n
        for n, e in json.loads(MANIFEST.read_text())["env"].items()
        if e["required"] and "value" not in e
    ],
)
def test_each_required_variable_is_one_production_refuses_to_start_without(name: str) -> None:
    environment = base_environment()
    del environment[name]
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(environment)
    assert name in refused.value.detail


def test_the_required_ones_are_exactly_those() -> None:
    env = manifest()["env"]
    required = {name for name, entry in env.items() if entry["required"] and "value" not in entry}
    assert required == {"AGENTKEYS_ISSUER", "AGENTKEYS_MAIL_URL", KEK_VAR}
    assert {name for name, entry in env.items() if entry["required"]} == required | {
        "AGENTKEYS_ENV"
    }
