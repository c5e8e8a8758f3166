"""The Dockerfiles, read statically (no image is built here): multi-stage on a slim base, every
file they copy exists in the build context (the repository root) and together they hold what
the wheel needs, the final stage runs as a non-root user, and every ``edgefleet`` command they
run, check or start is a real command with real options. The runtime profiles leave out the
runtimes an image is not for, and the code an image runs does not need them."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import tomllib

from tests.packaging.commands import (
    ROOT,
    check_command,
    invocations,
    known_variables,
    variables_in,
)


def _script(path: Path) -> ModuleType:
    """A script beside the Dockerfiles, loaded as a module."""
    spec = importlib.util.spec_from_file_location("edgefleet_image_requirements", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROFILES_SCRIPT = ROOT / "packaging" / "agent" / "requirements.py"
profiles = _script(PROFILES_SCRIPT)
# image -> health path, port variable, command it runs, the variable naming its volume
IMAGES = {
    "agent": ("/v2/health/ready", "EDGEFLEET_AGENT_PORT", "agent serve",
              "EDGEFLEET_AGENT_STATE_DIR"),
    "fleet": ("/api/v1/healthz", "EDGEFLEET_FLEET_PORT", "fleet serve", "EDGEFLEET_FLEET_HOME"),
}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass(frozen=True)
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages of a Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            stages.append(Stage(substitute(image, args), name.strip() or None, []))
        elif not stages:
            assert keyword == "ARG", f"{path}: {keyword} before the first FROM"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return args, stages


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_of(stage: Stage) -> dict[str, str]:
    return {
        key: value for args in stage.all("ENV") for key, value in re.findall(r"(\w+)=(\S+)", args)
    }


@pytest.fixture(params=sorted(IMAGES))
def image(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_each_image_is_multi_stage_on_a_slim_base(image: str) -> None:
    _, stages = parse(ROOT / "packaging" / image / "Dockerfile")
    assert len(stages) >= 2, "a build stage and a runtime stage"
    for stage in stages:
        assert re.fullmatch(r"python:3\.11-slim-\w+", stage.image), stage.image
    names = [s.name for s in stages]
    runtime = stages[-1]
    sources = [re.search(r"--from=(\S+)", c) for c in runtime.all("COPY")]
    assert all(m is not None and m.group(1) in names[:-1] for m in sources), (
        "the runtime stage takes only what the build stage made"
    )
    assert not runtime.all("RUN") or all("pip" not in r for r in runtime.all("RUN"))


def test_every_copied_file_exists_and_the_wheel_has_what_it_needs(image: str) -> None:
    _, stages = parse(ROOT / "packaging" / image / "Dockerfile")
    copied: set[str] = set()
    for stage in stages:
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
                copied.add(source.rstrip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = {"pyproject.toml", project["project"]["readme"], "constraints.txt", *packages}
    assert needed <= copied, f"the build stage misses {sorted(needed - copied)}"


def test_the_final_stage_runs_as_a_non_root_user(image: str) -> None:
    _, stages = parse(ROOT / "packaging" / image / "Dockerfile")
    users = stages[-1].all("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and int(user) >= 1000
    # The user the RUN creates is that uid, and it owns the folders the service writes.
    created = " ".join(stages[-1].all("RUN"))
    assert f"--uid {user}" in created and "-o edgefleet" in created


def test_the_image_starts_a_real_command_and_checks_the_real_health_endpoint(image: str) -> None:
    health, port_var, command, state_var = IMAGES[image]
    _, stages = parse(ROOT / "packaging" / image / "Dockerfile")
    runtime = stages[-1]
    entrypoint = exec_form(runtime.all("ENTRYPOINT")[-1])
    cmd = exec_form(runtime.all("CMD")[-1])
    assert entrypoint[0] == "edgefleet"
    assert check_command([*entrypoint[1:], *cmd]) == command
    # The build stage runs the installed command once: a broken install fails the build.
    ran = [args for stage in stages for r in stage.all("RUN") for args in invocations(r)]
    assert ran and all(check_command(args) == command for args in ran), ran

    env = env_of(runtime)
    (healthcheck,) = runtime.all("HEALTHCHECK")
    probe = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert probe[:2] == ["python", "-c"]
    assert f"os.environ['{port_var}']" in probe[2] and f"'{health}'" in probe[2]
    assert runtime.all("EXPOSE") == [env[port_var]]
    assert exec_form(runtime.all("VOLUME")[-1]) == [env[state_var]]
    assert env["PATH"].startswith("/opt/edgefleet/bin:")
    unknown = variables_in(" ".join(runtime.all("ENV"))) - known_variables()
    assert not unknown, f"ENV names variables nothing reads: {unknown}"


def test_the_runtime_profiles_carry_only_their_runtime() -> None:
    def names(profile: str) -> set[str]:
        lines = profiles.requirements(profile)
        return {re.split(r"[\[<>=;! ]", line, maxsplit=1)[0] for line in lines}

    assert "onnxruntime" in names("onnxruntime")
    assert {"openvino"} <= names("openvino") and "onnxruntime" not in names("openvino")
    assert {"ai-edge-litert"} <= names("litert") and "onnxruntime" not in names("litert")
    assert "openvino" not in names("onnxruntime") | names("litert") | names("fleet")
    assert {"fastapi", "sqlite-utils"} <= names("fleet") and "onnxruntime" not in names("fleet")
    _, stages = parse(ROOT / "packaging" / "agent" / "Dockerfile")
    default = next(a for a in stages[0].all("ARG") if a.startswith("RUNTIME="))
    assert default.removeprefix("RUNTIME=") in profiles.PROFILES
    unknown = subprocess.run(
        [sys.executable, str(PROFILES_SCRIPT), "tensorrt"], capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "usage" in unknown.stderr


def test_what_an_image_runs_does_not_import_the_runtimes_it_leaves_out() -> None:
    """The OpenVINO, LiteRT and fleet images have no onnxruntime: their code must not need it."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "import edgefleet.cli_agent, agent.service, agent.http.server, agent.managed\n"
        "import edgefleet.cli_fleet, edgefleet.cli_fleet_serve, fleet.service\n"
        "from click.testing import CliRunner\n"
        "from edgefleet.cli import cli\n"
        "for args in (['agent', 'serve', '--help'], ['fleet', 'serve', '--help']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0, args\n"
        "print(sorted(m for m in sys.modules if m.startswith(('openvino', 'ai_edge_litert'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
