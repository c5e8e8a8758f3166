"""The package boundaries of the design hold: who may import whom."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "fleet", "exporters", "protocol", "edgefleet")
# package -> packages it must never import ("edgefleet" itself only for its __version__)
FORBIDDEN = {
    "protocol": {"agent", "fleet", "exporters", "edgefleet"},
    "agent": {"fleet", "exporters"},
    "fleet": {"agent", "exporters"},
    "exporters": {"fleet"},
}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "edgefleet":  # only ``from edgefleet import __version__``
                found.update(f"edgefleet.{a.name}" for a in node.names if a.name != "__version__")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_the_design_allows(package: str) -> None:
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            top, _, rest = name.partition(".")
            if top in FORBIDDEN[package] and (top != "edgefleet" or rest):
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []


def test_the_base_install_imports_no_optional_runtime_at_start() -> None:
    """Importing the agent's server must not pull OpenVINO or LiteRT in."""
    import subprocess
    import sys

    code = (
        "import sys, agent.http.server, agent.service;"
        "print(sorted(m for m in ('openvino', 'ai_edge_litert', 'sklearn', 'onnx') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"
