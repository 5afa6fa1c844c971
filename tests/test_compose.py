"""docker-compose.yml and the Dockerfile: valid Compose, self-consistent, and in step with the code.

The file is parsed by a real Compose implementation (the compose-spec crate, via `compose_spec`),
after the same ${VAR:-default} interpolation Compose does. The cross-checks make the deployment
and the code unable to drift: topic names and partitions against streams/topics.py, WARDWATCH_*
variables against wardwatch/settings.py, service commands against the CLI.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from compose_spec import PyOptions

from streams.topics import topics_for
from wardwatch.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_PREFIX = "WARDWATCH_"
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")

OVERRIDES = {"WARDWATCH_TOPIC_PREFIX": "north", "WARDWATCH_CDC_TOPIC_PREFIX": "ehr2.public",
             "WARDWATCH_PARTITIONS": "12"}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR} and ${VAR:-default} substitution (the only forms the file uses)."""
    return _VARIABLE.sub(lambda m: env.get(m[1]) or m[2] or "", text)


def load_compose(env: dict[str, str] | None = None) -> dict:
    parsed = PyOptions(apply_merge=True).from_yaml(interpolate(COMPOSE.read_text(), env or {}))
    parsed.validate()
    parsed.validate_volumes()
    parsed.validate_networks()
    return parsed.to_dict()


def wardwatch_services(compose: dict) -> dict[str, dict]:
    """The services built from this repository's Dockerfile."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def dockerfile_entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.M)
    assert match, "the Dockerfile has no exec-form ENTRYPOINT"
    return json.loads(match[1])


def settings_from_env(env: dict, monkeypatch) -> Settings:
    """The Settings a container with this environment would read."""
    for name in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, str(value))
    return Settings()


def is_one_shot(service: dict) -> bool:
    return service.get("restart") == "no"


def has_healthcheck(service: dict) -> bool:
    check = service.get("healthcheck")
    return bool(check) and not check.get("disable", False) and bool(check.get("test"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def test_interpolated_file_is_valid_compose(compose):
    assert "${" not in json.dumps(compose), "a variable form the interpolation does not know"
    assert wardwatch_services(compose), "no service is built from the Dockerfile"


def test_every_dependency_exists_and_can_satisfy_its_condition(compose):
    services = compose["services"]
    for name, svc in services.items():
        for target, dep in (svc.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = dep.get("condition", "service_started")
            if has_healthcheck(services[target]):  # started is not ready: wait for the check
                assert condition == "service_healthy", f"{name} starts before {target} is healthy"
            if condition == "service_healthy":
                assert has_healthcheck(services[target]), f"{name} waits for {target} to be healthy, it has no healthcheck"
            if condition == "service_completed_successfully":
                assert is_one_shot(services[target]), f"{name} waits for {target} to finish, it restarts"


def test_wardwatch_services_wait_for_the_broker_and_the_topics(compose):
    for name, svc in wardwatch_services(compose).items():
        if is_one_shot(svc):  # the nightly batch reads the archive, not Kafka
            continue
        deps = svc.get("depends_on") or {}
        assert deps.get("kafka", {}).get("condition") == "service_healthy", name
        assert deps.get("topics-init", {}).get("condition") == "service_completed_successfully", name


def test_every_named_volume_is_declared_and_every_bind_source_exists(compose):
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing path {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_every_long_running_service_has_a_healthcheck(compose):
    for name, svc in compose["services"].items():
        assert has_healthcheck(svc) or is_one_shot(svc), f"{name} runs forever without a healthcheck"


def test_wardwatch_variables_name_real_settings(compose):
    fields = set(Settings.model_fields)
    for name, svc in wardwatch_services(compose).items():
        for var in svc.get("environment") or {}:
            if var.startswith(ENV_PREFIX):
                assert var.removeprefix(ENV_PREFIX).lower() in fields, f"{name}: {var} is not a setting"


def test_topics_init_creates_the_topics_of_the_code_with_default_settings(compose, monkeypatch):
    init = compose["services"]["topics-init"]["environment"]
    code = topics_for(settings_from_env({}, monkeypatch))

    assert sorted(init["TOPICS"].split()) == sorted(code.all)
    assert int(init["PARTITIONS"]) == code.partitions


@pytest.mark.parametrize("env", [{}, OVERRIDES], ids=["defaults", "overridden"])
def test_topics_init_and_every_service_agree_on_topics_and_partitions(env, monkeypatch):
    compose = load_compose(env)
    init = compose["services"]["topics-init"]["environment"]
    for name, svc in wardwatch_services(compose).items():
        service_topics = topics_for(settings_from_env(svc["environment"], monkeypatch))
        assert sorted(init["TOPICS"].split()) == sorted(service_topics.all), name
        assert int(init["PARTITIONS"]) == service_topics.partitions, name
    if env:
        assert "north.canonical" in init["TOPICS"].split()


def test_healthcheck_scripts_are_copied_into_the_image(compose):
    copies = dict(
        reversed(m.groups())
        for m in re.finditer(r"^COPY\s+(?!--from)(\S+)\s+(\S+)\s*$", DOCKERFILE.read_text(), re.M)
    )  # destination -> source
    for name, svc in wardwatch_services(compose).items():
        if not has_healthcheck(svc):
            continue
        for arg in svc["healthcheck"]["test"]:
            if arg.startswith("/opt/wardwatch/"):
                assert arg in copies, f"{name}'s healthcheck runs {arg}, the Dockerfile does not copy it"
                assert (ROOT / copies[arg]).is_file()


def test_dockerfile_builds_a_venv_and_runs_it_unprivileged():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm$", text, re.M), "base not pinned"
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS builder$", text, re.M)
    assert re.search(r"^COPY --from=builder /opt/venv /opt/venv$", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the runtime runs as root"
    assert dockerfile_entrypoint() == ["wardwatch"]


def test_dockerfile_copies_every_package_the_project_installs():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY\s+(\w+)/\s", DOCKERFILE.read_text(), re.M))
    for pattern in include:
        assert pattern.rstrip("*").rstrip(".") in copied, f"the image would be built without {pattern}"


def test_service_commands_are_wardwatch_subcommands(compose):
    try:
        cli = importlib.import_module("wardwatch.cli")
    except ModuleNotFoundError as exc:
        if exc.name != "wardwatch.cli":
            raise
        pytest.skip("wardwatch.cli does not exist yet: service commands cannot be checked against the CLI")
    import typer

    root = typer.main.get_command(cli.app)
    for name, svc in wardwatch_services(compose).items():
        argv = [*dockerfile_entrypoint(), *svc["command"]]
        assert argv[0] == "wardwatch", name
        command = root
        # walk the command groups (anything with .commands: typer may vendor its own click)
        for word in argv[1:]:
            if word.startswith("-") or not hasattr(command, "commands"):
                break
            command = command.commands.get(word)
            assert command is not None, f"{name}: `{' '.join(argv)}` is not a wardwatch command"
        assert not hasattr(command, "commands"), f"{name}: `{' '.join(argv)}` names a group, not a command"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_docker_compose_itself_accepts_the_file():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    result = subprocess.run([*cli, "-f", str(COMPOSE), "--profile", "batch", "config", "-q"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
