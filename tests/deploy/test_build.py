"""The lock files: every dependency pinned with hashes, and the Makefile and the image installing from them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.test_deploy import dockerfile_instructions, stages

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
RENEW = "run `make lock` to resolve pyproject.toml's dependencies into the lock files again"


def pins(lock: str) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, hashes)} of a pip-compile --generate-hashes file."""
    text = (REPO / lock).read_text()
    found = {}
    for block in re.split(r"\n(?=\S)", text):
        head = block.split("\\", 1)[0].strip()
        if not head or head.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)(?:\s*;.*)?", head)
        assert match, f"{lock}: not an exact pin: {head!r}"
        found[canonicalize_name(match.group(1))] = (match.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return found


def needed(requirements: list[str]) -> list[Requirement]:
    """The requirements that apply on this machine (environment markers evaluated)."""
    environment = default_environment() | {"extra": "test"}
    return [r for r in map(Requirement, requirements) if r.marker is None or r.marker.evaluate(environment)]


@pytest.mark.parametrize("lock, requirements", [
    ("requirements.lock", PROJECT["dependencies"]),
    ("requirements-test.lock", PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]),
])
def test_each_lock_pins_every_dependency_at_a_version_pyproject_allows(lock, requirements):
    pinned = pins(lock)
    for requirement in needed(requirements):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{lock} has no {requirement.name}: {RENEW}"
        assert requirement.specifier.contains(pinned[name][0], prereleases=True), \
            f"{lock} pins {name}=={pinned[name][0]}, outside {requirement}: {RENEW}"


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-test.lock"])
def test_every_pin_carries_hashes(lock):
    for name, (version, hashes) in pins(lock).items():
        assert hashes, f"{lock}: {name}=={version} has no --hash (pip-compile --generate-hashes)"


def test_run_and_test_installs_get_the_same_versions():
    runtime, test = pins("requirements.lock"), pins("requirements-test.lock")
    assert {name: test.get(name, (None,))[0] for name in runtime} == {n: v for n, (v, _) in runtime.items()}


def recipe(target: str) -> list[str]:
    """The commands of a Makefile target, variables left as written."""
    text = (REPO / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert match, f"no {target} target in the Makefile"
    return [line.strip() for line in match.group(1).splitlines()]


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*:?=\s*(\S+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, name
    return match.group(1)


@pytest.mark.parametrize("target, lock", [("$(BIN)/.installed", "requirements.lock"),
                                          ("$(BIN)/.installed-test", "requirements-test.lock")])
def test_the_makefile_installs_the_lock_then_the_package_without_resolving(target, lock):
    installs = [line for line in recipe(target) if "pip install" in line and "--upgrade pip" not in line]
    variable = {"requirements.lock": "LOCK", "requirements-test.lock": "TEST_LOCK"}[lock]
    assert makefile_variable(variable) == lock
    assert installs == [f"$(BIN)/pip install -q --require-hashes -r $({variable})",
                        "$(BIN)/pip install -q --no-deps -e ."]
    header = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith(f"{target}:"))
    assert f"$({variable})" in header, "a changed lock must reinstall"


def test_the_image_builds_its_wheels_from_the_lock():
    _, found = stages(dockerfile_instructions((REPO / "Dockerfile").read_text()))
    builder = found[0]
    copied = " ".join(rest for keyword, rest in builder if keyword == "COPY")
    assert "requirements.lock" in copied
    (wheels,) = [rest for keyword, rest in builder if keyword == "RUN" and "pip wheel" in rest]
    assert "--require-hashes -r requirements.lock" in wheels
    assert "--no-deps ." in wheels, "the project's own wheel must not resolve versions of its own"
