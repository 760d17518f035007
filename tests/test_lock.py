"""requirements.lock is in step with pyproject.toml: every dependency, the dev extra's too, is
pinned there to a version its specifier allows, with hashes, so bin/setup installs exactly that."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.live import ROOT

_PIN = re.compile(r"^([A-Za-z0-9._-]+(?:\[[^\]]*\])?)==([^ ;\\]+)(?: ;[^\\]*)? \\$")


def pinned(text: str) -> dict[str, tuple[Version, int]]:
    """name -> (version, number of hashes) of a `uv pip compile --generate-hashes` file."""
    found: dict[str, tuple[Version, int]] = {}
    name = ""
    for line in text.splitlines():
        if match := _PIN.match(line):
            name = canonicalize_name(Requirement(match[1]).name)
            found[name] = (Version(match[2]), 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            version, hashes = found[name]
            found[name] = (version, hashes + 1)
    return found


def test_every_dependency_is_locked_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    locked = pinned((ROOT / "requirements.lock").read_text())
    assert len(locked) > 100  # the whole tree, not just the direct dependencies
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in requirements.lock: run bin/lock"
        version, hashes = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, outside {requirement.specifier}: "
            "run bin/lock"
        )
        assert hashes >= 1, f"{name} has no hash"
    assert all(hashes >= 1 for _, hashes in locked.values())


def test_uv_is_locked_with_hashes() -> None:
    locked = pinned((ROOT / "bin" / "uv.lock").read_text())
    assert list(locked) == ["uv"] and locked["uv"][1] >= 1


def test_the_reader_sees_a_lock_as_uv_writes_it() -> None:
    sample = (
        "flask==3.1.2 \\\n"
        "    --hash=sha256:aa \\\n"
        "    --hash=sha256:bb\n"
        "    # via agentkeys (pyproject.toml)\n"
        "psycopg-binary==3.2.9 ; implementation_name != 'pypy' \\\n"
        "    --hash=sha256:cc\n"
    )
    assert pinned(sample) == {
        "flask": (Version("3.1.2"), 2),
        "psycopg-binary": (Version("3.2.9"), 1),
    }
