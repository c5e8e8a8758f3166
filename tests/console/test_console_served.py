"""The console as the fleet service serves it: where it lives, its headers, and that every asset
it needs is in the package and comes from the service itself (no CDN, no build step)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from edgefleet.cli import cli
from fleet.console import ASSETS, SECURITY_HEADERS
from fleet.service import FleetService
from fleet.settings import FleetSettings
from tests.fleet.test_repository import Served

# `import ... from "./x.js"` and `import "./x.js"`: the modules the console loads.
IMPORT = re.compile(
    r"""^\s*(?:import\s+(?:[\w*{}\s,]+\s+from\s+)?|export\s+[\w*{}\s,]+\s+from\s+)["']([^"']+)["']""",
    re.M,
)
# href= and src= in the page.
REFERENCE = re.compile(r"""(?:href|src)="([^"#][^"]*)\"""")
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, FleetService]]:
    home = tmp_path / "home"
    init = CliRunner().invoke(cli, ["fleet", "--home", str(home), "keys", "init"])
    assert init.exit_code == 0, init.output
    service = FleetService(FleetSettings(home=home))  # lifespan off: no broker is needed
    try:
        with Served(service.app()) as server:
            yield server.url, service
    finally:
        service.store.close()


def assets() -> list[Path]:
    return sorted(p for p in ASSETS.rglob("*") if p.is_file())


def test_the_root_leads_to_the_console_and_the_page_is_served_with_strict_headers(
    served: tuple[str, FleetService],
) -> None:
    url, _ = served
    root = httpx.get(f"{url}/")
    assert root.status_code == 307 and root.headers["location"] == "/console/"
    page = httpx.get(f"{url}/console/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>edgefleet console</title>" in page.text
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_every_asset_is_served_with_a_type_the_browser_accepts(
    served: tuple[str, FleetService],
) -> None:
    url, _ = served
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
             ".html": "text/html"}  # fmt: skip
    for path in assets():
        relative = path.relative_to(ASSETS).as_posix()
        response = httpx.get(f"{url}/console/{relative}")
        assert response.status_code == 200, relative
        # Browsers refuse a module script served with another type.
        assert response.headers["content-type"].startswith(types[path.suffix]), relative
        assert response.content == path.read_bytes()
    assert httpx.get(f"{url}/console/nothing-here.js").status_code == 404


def test_every_module_and_reference_resolves_inside_the_assets() -> None:
    page = (ASSETS / "index.html").read_text()
    for reference in REFERENCE.findall(page):
        if reference.startswith("/api/v1"):
            continue  # the noscript link to the API
        assert (ASSETS / reference).is_file(), reference
    scripts = [p for p in assets() if p.suffix == ".js"]
    assert {p.name for p in scripts} >= {"app.js", "api.js", "ui.js", "charts.js"}
    for script in scripts:
        imports = IMPORT.findall(script.read_text())
        for target in imports:
            assert target.startswith(("./", "../")), (script, target)
            assert (script.parent / target).resolve().is_file(), (script, target)
    assert IMPORT.findall((ASSETS / "app.js").read_text())  # the pattern does find imports


def test_no_asset_loads_anything_from_another_origin() -> None:
    for path in assets():
        text = path.read_text().replace(SVG_NAMESPACE, "")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), path


def test_me_names_the_calling_token_and_its_role(served: tuple[str, FleetService]) -> None:
    url, service = served
    secret = service.store.tokens.create("ops-viewer", "viewer", "test").secret
    refused = httpx.get(f"{url}/api/v1/me")
    assert refused.status_code == 401 and refused.json()["reason"] == "unauthenticated"
    me = httpx.get(f"{url}/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.status_code == 200
    assert (me.json()["name"], me.json()["role"]) == ("ops-viewer", "viewer")
    assert "secret" not in me.json() and "hash" not in me.text
