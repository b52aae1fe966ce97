"""requirements.txt, environment.yml, pyproject.toml and the installed packages tell the same story."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata

import yaml

from wadi_core.artifacts import REPO_ROOT

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)$")


def _pins(lines: list[str], source: str) -> dict[str, str]:
    """``{name: version}`` from ``name==version`` lines; anything else is an error naming ``source``."""
    pins = {}
    for line in lines:
        match = PIN.match(line.strip())
        assert match, f"{source}: {line!r} is not pinned as name==version"
        assert match["name"] not in pins, f"{source}: {match['name']} is listed twice"
        pins[match["name"]] = match["version"]
    return pins


def _requirements() -> dict[str, str]:
    lines = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    return _pins([line for line in lines if line.strip() and not line.lstrip().startswith("#")], "requirements.txt")


def _environment() -> dict:
    return yaml.safe_load((REPO_ROOT / "environment.yml").read_text())


def _conda_pip_pins() -> dict[str, str]:
    pip_lists = [dep["pip"] for dep in _environment()["dependencies"] if isinstance(dep, dict) and "pip" in dep]
    assert len(pip_lists) == 1, "environment.yml needs exactly one `pip:` list"
    return _pins(pip_lists[0], "environment.yml")


def test_environment_yml_mirrors_requirements():
    requirements, conda = _requirements(), _conda_pip_pins()
    drift = [f"only in requirements.txt: {n}=={v}" for n, v in requirements.items() if n not in conda]
    drift += [f"only in environment.yml:  {n}=={v}" for n, v in conda.items() if n not in requirements]
    drift += [
        f"version differs: {n} requirements.txt=={v}, environment.yml=={conda[n]}"
        for n, v in requirements.items()
        if n in conda and conda[n] != v
    ]
    assert not drift, "requirements.txt and environment.yml disagree:\n" + "\n".join(drift)


def test_environment_yml_declares_python_and_pip():
    env = _environment()
    assert env["name"] == "wadi-companion"
    assert env["channels"] == ["conda-forge"]
    assert "python=3.11" in env["dependencies"] and "pip" in env["dependencies"]


def test_torch_and_torchvision_are_pinned_to_the_clean_fid_pair():
    requirements = _requirements()
    assert requirements.get("torch") == "2.14.1"
    assert requirements.get("torchvision") == "0.29.1"


def test_pyproject_takes_dependencies_from_requirements():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "wadi-companion"
    assert "dependencies" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    assert sys.version_info >= (3, 11)


def test_installed_packages_match_the_pins():
    mismatched = []
    for name, pinned in _requirements().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != pinned:
            mismatched.append(f"{name}: pinned {pinned}, installed {installed}")
    assert not mismatched, "the environment does not match requirements.txt (run `make venv`):\n" + "\n".join(
        mismatched
    )
