"""The packages an edgefleet image installs, as a requirements file: the project's dependencies
for one profile, read from pyproject.toml.

The base install carries ONNX Runtime, which most devices run. An image for another runtime
leaves it out and adds that runtime's extra instead, so a device carries only the runtime it
uses; the agent imports runtimes only when a bundle needs one, so nothing else changes. The
fleet needs no runtime at all. Used by the Dockerfiles and benchmarks/footprint::

    python packaging/agent/requirements.py openvino > requirements.txt
    pip install -c constraints.txt -r requirements.txt
    pip install --no-deps edgefleet-*.whl
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

__all__ = ["PROFILES", "requirements"]

# profile -> (extras added, base packages left out)
PROFILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "onnxruntime": ((), ()),
    "openvino": (("openvino",), ("onnxruntime",)),
    "litert": (("litert",), ("onnxruntime",)),
    "fleet": (("fleet",), ("onnxruntime",)),
}
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def requirements(profile: str, pyproject: Path = PYPROJECT) -> list[str]:
    """The requirement lines of ``profile`` (see :data:`PROFILES`)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    extras, dropped = PROFILES[profile]
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = [r for r in project["dependencies"] if _name(r) not in dropped]
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in PROFILES:
        print(f"usage: requirements.py {{{'|'.join(PROFILES)}}}", file=sys.stderr)
        return 2
    print("\n".join(requirements(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
