"""Writes a pinned requirement set from pyproject.toml and the versions installed in this venv."""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]

# The images are Linux/CPython 3.11 on both arches, whatever machine runs this script, so
# markers are evaluated for those targets rather than for the host.
TARGET_MACHINES = ("x86_64", "aarch64")


def target_environment(machine: str) -> dict[str, str]:
    env = {key: str(value) for key, value in default_environment().items()}
    env.update(
        sys_platform="linux",
        platform_system="Linux",
        os_name="posix",
        platform_machine=machine,
        platform_python_implementation="CPython",
        implementation_name="cpython",
        python_version="3.11",
    )
    return env


@dataclass
class Needed:
    """One distribution in the closure: the extras asked of it and the arches that need it."""

    extras: set[str] = field(default_factory=set)
    machines: set[str] = field(default_factory=set)


def marker_holds(marker: Marker | None, machine: str, extras: set[str]) -> bool:
    if marker is None:
        return True
    env = target_environment(machine)
    return any(marker.evaluate({**env, "extra": extra}) for extra in extras | {""})


def closure(roots: list[Requirement]) -> dict[NormalizedName, Needed]:
    """Every distribution the roots need on some target arch, walked over installed metadata."""
    found: dict[NormalizedName, Needed] = {}
    todo: list[tuple[Requirement, str, set[str]]] = [
        (req, machine, set()) for req in roots for machine in TARGET_MACHINES
    ]
    while todo:
        req, machine, parent_extras = todo.pop()
        if not marker_holds(req.marker, machine, parent_extras):
            continue
        name = canonicalize_name(req.name)
        needed = found.setdefault(name, Needed())
        new_extras = set(req.extras) - needed.extras
        if machine in needed.machines and not new_extras:
            continue
        needed.machines.add(machine)
        needed.extras |= new_extras
        installed = Version(metadata.version(name))
        if not req.specifier.contains(installed, prereleases=True):
            sys.exit(f"installed {name} {installed} does not satisfy {req} - fix the venv first")
        for dep in metadata.requires(name) or []:
            todo.append((Requirement(dep), machine, needed.extras))
    return found


def pinned_lines(found: dict[NormalizedName, Needed], skip: set[NormalizedName]) -> list[str]:
    lines = []
    for name in sorted(found.keys() - skip):
        # The public version drops local labels such as torch's "+cpu": the index serves the
        # plain version, and "==2.13.0" still accepts a local build of it.
        line = f"{name}=={Version(metadata.version(name)).public}"
        machines = found[name].machines
        if machines != set(TARGET_MACHINES):
            (only,) = machines
            line += f' ; platform_machine == "{only}"'
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--extra",
        help="lock this optional-dependency group instead, less what the runtime set already pins",
    )
    args = parser.parse_args()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = closure([Requirement(r) for r in project["dependencies"]])
    skip: set[NormalizedName] = set()
    if args.extra is None:
        found = runtime
        what = "pyproject.toml's [project] dependencies (the server runtime)"
        command = "> deploy/requirements.txt"
    else:
        extra_reqs = project["optional-dependencies"][args.extra]
        found, skip = closure([Requirement(r) for r in extra_reqs]), set(runtime)
        what = f"pyproject.toml's '{args.extra}' extra, on top of deploy/requirements.txt"
        command = f"--extra {args.extra} > deploy/requirements-{args.extra}.txt"
    print(
        f"# Pinned closure of {what}\n"
        "# at the versions installed in .venv, for linux x86_64 + aarch64, CPython 3.11.\n"
        "# Do not edit by hand. Regenerate after changing pyproject.toml or upgrading the venv:\n"
        f"#   .venv/bin/python deploy/lock_requirements.py {command}"
    )
    print("\n".join(pinned_lines(found, skip)))


if __name__ == "__main__":
    main()
