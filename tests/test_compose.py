"""docker-compose.yml and the Dockerfile: valid Compose, self-consistent, and in step with the code.

The file is parsed by a real Compose implementation (the compose-spec crate, via `compose_spec`),
after the same ${VAR:-default} interpolation Compose does (`docker compose config` too, where the
plugin is installed). The cross-checks make the deployment and the code unable to drift: topics
(created by `wardwatch deploy topics` from streams/topics.py) with the same settings as every
service, WARDWATCH_* variables against wardwatch/settings.py, service commands against the CLI,
the PostgreSQL server arguments, the one-shot init services' URLs, the Prometheus scrape config.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from compose_spec import PyOptions

from streams import replay
from streams.topics import topics_for
from wardwatch.deploy import topic_specs
from wardwatch.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_PREFIX = "WARDWATCH_"
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")

# long-running services that never talk to Kafka: the scheduler runs the nightly batch over the archive
NO_KAFKA = {"scheduler"}

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
        if is_one_shot(svc) or name in NO_KAFKA:
            continue
        deps = svc.get("depends_on") or {}
        assert deps.get("kafka", {}).get("condition") == "service_healthy", name
        assert deps.get("topics-init", {}).get("condition") == "service_completed_successfully", name


def test_the_broker_hint_of_every_command_names_the_address_compose_gives_this_host(compose):
    # `wardwatch stats` on the host after `docker compose up`: the one-line error said to start the
    # compose kafka, and nothing of localhost:29092, where the host reaches it
    from wardwatch import preflight
    from wardwatch.settings import Settings

    kafka = compose["services"]["kafka"]
    assert f"127.0.0.1:{preflight.COMPOSE_KAFKA_HOST_PORT}:29092" in kafka["ports"]
    assert f"HOST://localhost:{preflight.COMPOSE_KAFKA_HOST_PORT}" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    hint = preflight.broker_problem(Settings(bootstrap_servers="127.0.0.1:1"), timeout_s=0.5)
    assert f"localhost:{preflight.COMPOSE_KAFKA_HOST_PORT}" in hint and "WARDWATCH_BOOTSTRAP_SERVERS" in hint


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


def test_the_workers_healthcheck_asks_its_readiness(compose):
    """The worker's /readyz is 503 while it applies nothing it should (its consumption watchdog):
    its container must show unhealthy then, so its healthcheck asks /readyz (deploy/healthcheck.py --ready).
    The receiver's is 503 while its producer cannot reach the broker: the FHIR server's posts then fail;
    the CDS service's until it has re-read the scores after a start: its calls answer 503 meanwhile."""
    for name in ("worker", "ingest", "archiver", "subscriptions", "receiver", "cds"):
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/opt/wardwatch/healthcheck.py"] and "--ready" in test, name


def test_the_schedulers_healthcheck_reports_failed_and_missing_nightlies(compose):
    """The scheduler's healthcheck reads its nightly status (deploy/healthcheck.py --nightly): without the
    flag a failed nightly was only a log line and the container stayed healthy."""
    test = compose["services"]["scheduler"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "/opt/wardwatch/healthcheck.py"] and "--nightly" in test


def test_wardwatch_variables_name_real_settings(compose):
    fields = set(Settings.model_fields)
    for name, svc in wardwatch_services(compose).items():
        for var in svc.get("environment") or {}:
            if var.startswith(ENV_PREFIX):
                assert var.removeprefix(ENV_PREFIX).lower() in fields, f"{name}: {var} is not a setting"


@pytest.mark.parametrize("zone", [None, "Europe/Berlin"])
def test_every_service_reads_cdc_times_in_the_zone_set_in_env(zone, monkeypatch):
    """WARDWATCH_CDC_TIMEZONE in .env reaches every wardwatch service (the ingest reads CDC times in it);
    unset, UTC."""
    compose = load_compose({"WARDWATCH_CDC_TIMEZONE": zone} if zone else {})
    for name, svc in wardwatch_services(compose).items():
        assert settings_from_env(svc["environment"], monkeypatch).cdc_timezone == (zone or "UTC"), name


@pytest.mark.parametrize("system", [None, "urn:oid:2.16.840.1.113883.19.5"])
def test_every_service_takes_for_the_mrn_only_identifiers_of_the_mrn_system(system, monkeypatch):
    """WARDWATCH_MRN_SYSTEM reaches every wardwatch service (the ingest and the receiver key subjects by it, the
    CDS service its prefetched Patient); unset in .env, the system the demo feeder writes its MRNs in, so the
    demo's subjects keep their MRN (a subject identifier of another system would be no MRN)."""
    compose = load_compose({"WARDWATCH_MRN_SYSTEM": system} if system else {})
    for name, svc in wardwatch_services(compose).items():
        assert settings_from_env(svc["environment"], monkeypatch).mrn_system == (system or replay.MRN_SYSTEM), name


def test_topics_init_creates_the_topics_from_the_code(compose):
    init = compose["services"]["topics-init"]
    assert "build" in init and init["command"] == ["deploy", "topics"]
    assert is_one_shot(init)


@pytest.mark.parametrize("env", [{}, OVERRIDES], ids=["defaults", "overridden"])
def test_topics_init_and_every_service_agree_on_topics_and_partitions(env, monkeypatch):
    compose = load_compose(env)
    init = topic_specs(settings_from_env(compose["services"]["topics-init"]["environment"], monkeypatch))
    for name, svc in wardwatch_services(compose).items():
        service_topics = topics_for(settings_from_env(svc["environment"], monkeypatch))
        assert sorted(s.name for s in init) == sorted(service_topics.all), name
        assert {s.partitions for s in init} == {service_topics.partitions}, name
    if env:
        assert "north.canonical" in {s.name for s in init}
        assert {s.partitions for s in init} == {12}


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


def test_a_fresh_models_volume_starts_with_the_shipped_model(compose):
    """Docker fills a new named volume with what the image holds at its mount point: with the shipped
    registry there, a fresh deployment's workers score with the shipped model, not the NEWS2 rule."""
    from batch import registry

    text = DOCKERFILE.read_text()
    runtime_user = re.findall(r"^USER\s+(\S+)", text, re.M)[-1]
    copies = {dest.rstrip("/"): (source.rstrip("/"), options)  # destination -> (source, options)
              for options, source, dest in re.findall(r"^COPY\s+((?:--\S+\s+)*)(\S+)\s+(\S+)\s*$", text, re.M)}
    for name, svc in wardwatch_services(compose).items():
        model_dir = svc["environment"]["WARDWATCH_MODEL_DIR"]
        assert f"models:{model_dir}" in svc["volumes"], f"{name}: WARDWATCH_MODEL_DIR is not the models volume"
        assert model_dir in copies, f"the image has no model registry at {model_dir}"
        source, options = copies[model_dir]
        assert f"--chown={runtime_user}" in options, "the runtime user could not promote or roll back"
        current = registry.current_version(ROOT / source)
        assert current is not None and registry.integrity(ROOT / source, current) == "ok", \
            f"{source}/current names no intact model"


def test_dockerfile_copies_every_package_the_project_installs():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY\s+(\w+)/\s", DOCKERFILE.read_text(), re.M))
    for pattern in include:
        assert pattern.rstrip("*").rstrip(".") in copied, f"the image would be built without {pattern}"


def _extras_the_image_installs() -> list[str]:
    """The project's extras in the Dockerfile's `pip install '.[a,b]'` (none for `pip install .`)."""
    match = re.search(r"pip install '?\.(?:\[([\w,-]+)\])?'?\s*$", DOCKERFILE.read_text(), re.M)
    assert match, "the Dockerfile does not pip install the project"
    return match[1].split(",") if match[1] else []


def _distributions_in_image() -> set[str]:
    """Every distribution that install puts in the image: the project's requirements with those
    extras, and theirs, as this environment's package metadata declares them."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    for extra in _extras_the_image_installs():
        todo += [Requirement(r) for r in project["optional-dependencies"][extra]]
    seen: set[tuple[str, str]] = set()  # (distribution, extra or "")
    while todo:
        req = todo.pop()
        for extra in {"", *req.extras}:
            if (canonicalize_name(req.name), extra) in seen:
                continue
            seen.add((canonicalize_name(req.name), extra))
            for spec in requires(req.name) or []:
                dep = Requirement(spec)
                if dep.marker is None or dep.marker.evaluate({"extra": extra}):
                    todo.append(dep)
    return {name for name, _ in seen}


def test_the_image_installs_every_library_the_code_imports():
    """`wardwatch batch nightly` labels with batch.train, which needs scikit-learn: an image without
    it fails every nightly (and `batch train`) with ModuleNotFoundError."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    ours = {pattern.rstrip("*").rstrip(".") for pattern in include}
    provided_by = packages_distributions()  # import name -> distributions
    in_image = _distributions_in_image()
    missing = {}
    for package in sorted(ours):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names} - ours - sys.stdlib_module_names:
                    if not {canonicalize_name(d) for d in provided_by.get(top, [top])} & in_image:
                        missing.setdefault(top, str(path.relative_to(ROOT)))
    assert not missing, f"imported, but not installed in the image (module: first importer): {missing}"


def _service_commands() -> list:
    """(service, command words before the first option), one param per wardwatch service."""
    params = []
    for name, svc in sorted(wardwatch_services(load_compose()).items()):
        words = []
        for word in svc["command"]:
            if word.startswith("-"):
                break
            words.append(word)
        params.append(pytest.param(name, words, id=name))
    return params


@pytest.mark.parametrize("service, words", _service_commands())
def test_service_command_is_a_wardwatch_subcommand_whose_help_runs(service, words):
    import typer
    from typer.testing import CliRunner

    from wardwatch.cli import app

    assert dockerfile_entrypoint() == ["wardwatch"]
    command = typer.main.get_command(app)
    for word in words:  # walk the groups (anything with .commands: typer may vendor its own click)
        assert hasattr(command, "commands") and word in command.commands, \
            f"{service}: `wardwatch {' '.join(words)}` is not a wardwatch command"
        command = command.commands[word]
    runnable_group = getattr(command, "invoke_without_command", False)  # e.g. `wardwatch subscriptions`
    assert runnable_group or not hasattr(command, "commands"), \
        f"{service}: `wardwatch {' '.join(words)}` names a group, not a command"

    result = CliRunner().invoke(app, [*words, "--help"])
    assert result.exit_code == 0, result.output


def test_service_options_are_options_of_the_command():
    """`--apply`, `--receiver`, ... in compose must be real options (a typo would fail at deploy time)."""
    import typer

    from wardwatch.cli import app

    root = typer.main.get_command(app)
    for name, svc in wardwatch_services(load_compose()).items():
        command, words = root, list(svc["command"])
        while words and not words[0].startswith("-") and hasattr(command, "commands"):
            command = command.commands.get(words.pop(0))
            if command is None:
                break  # reported by the test above
        if command is None:
            continue
        known = {opt for param in command.params for opt in getattr(param, "opts", [])}
        for word in words:
            if word.startswith("--"):
                assert word in known, f"{name}: {word} is not an option of its command"


def _compose_cli() -> list[str] | None:
    """A real Compose implementation: Docker's compose v2 plugin, else podman-compose (a Python
    implementation of the Compose spec; it needs the `podman` binary, which .ci/run installs from
    Debian). docker-compose v1 is not one: it predates the Compose spec (no top-level `name`)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    podman_compose = shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")
    if shutil.which("podman") and Path(podman_compose).exists():
        return [podman_compose]
    return None


def resolve_with_compose(compose_file: Path = COMPOSE) -> dict:
    """`<compose> config` of the file with every profile: the services as the implementation resolves
    them (anchors, merge keys, ${...} defaults; WARDWATCH_* variables of this shell left out)."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Compose implementation: neither `docker compose` nor podman-compose with podman "
                    "(apt-get install podman; pip install podman-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    profiles = [arg for p in sorted(PROFILES) for arg in ("--profile", p)]
    result = subprocess.run([*cli, "-f", str(compose_file), *profiles, "config"],
                            capture_output=True, text=True, timeout=60, cwd=compose_file.parent, env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def container_environment(service: dict, project_dir: Path) -> dict[str, str]:
    """The environment a container of a resolved service starts with: its env files, then
    `environment`, which wins (the Compose spec's order). `docker compose config` has merged the
    files in already; podman-compose lists them and reads them when it creates the container."""
    from dotenv import dotenv_values

    env: dict[str, str] = {}
    for entry in service.get("env_file") or []:
        path = project_dir / (entry if isinstance(entry, str) else entry["path"])
        if path.is_file():
            env.update(dotenv_values(path))
    return env | {name: str(value) for name, value in (service.get("environment") or {}).items()}


def test_a_compose_implementation_accepts_the_file():
    resolved = resolve_with_compose()
    # the implementation resolved the anchors and defaults the way the services need them
    assert set(resolved["services"]) == set(yaml.safe_load(COMPOSE.read_text())["services"])
    worker_env = resolved["services"]["worker"]["environment"]
    assert worker_env["WARDWATCH_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert str(worker_env["WARDWATCH_METRICS_PORT"]) == "9108"


def test_a_setting_in_wardwatch_env_reaches_the_containers(tmp_path):
    """An .env file only fills this file's ${...}; the receiver's token must reach the receiver (else
    it accepts any request) and subscription-init (which gives it to the FHIR server)."""
    shutil.copy(COMPOSE, tmp_path / COMPOSE.name)
    (tmp_path / "wardwatch.env").write_text("WARDWATCH_RECEIVER_TOKEN=s3cret\nWARDWATCH_LOG_LEVEL=DEBUG\n")
    services = wardwatch_services(resolve_with_compose(tmp_path / COMPOSE.name))
    assert {"receiver", "subscription-init"} <= set(services)
    for name, svc in services.items():
        env = container_environment(svc, tmp_path)
        assert env.get("WARDWATCH_RECEIVER_TOKEN") == "s3cret", f"{name} runs without the receiver token"
        assert env.get("WARDWATCH_LOG_LEVEL") == "DEBUG", name


def test_wardwatch_env_example_names_settings_the_compose_file_does_not_override(compose):
    """A variable in wardwatch.env that the compose file also sets would be silently ignored."""
    example = (ROOT / "wardwatch.env.example").read_text()
    named = re.findall(r"^#?\s*(WARDWATCH_\w+)=", example, re.M)
    assert "WARDWATCH_RECEIVER_TOKEN" in named
    fields = set(Settings.model_fields)
    overridden = {var for svc in wardwatch_services(compose).values() for var in svc.get("environment") or {}}
    for var in named:
        assert var.removeprefix(ENV_PREFIX).lower() in fields, f"{var} is not a setting"
        assert var not in overridden, f"{var} is set by docker-compose.yml, which wins over wardwatch.env"


ONE_SHOTS = {"topics-init", "connector-init", "subscription-init", "nightly", "feeder"}


def test_one_shot_services_never_restart_under_a_real_compose(compose):
    """A one-shot that restarts runs again after exiting 0, for ever: the feeder would insert its demo
    cohort again and again. The merge keys must resolve the same in every implementation."""
    assert {name for name, svc in compose["services"].items() if is_one_shot(svc)} == ONE_SHOTS
    resolved = resolve_with_compose()["services"]
    for name in ONE_SHOTS:
        assert resolved[name].get("restart") == "no", f"{name} resolves to restart: {resolved[name].get('restart')}"
        assert not has_healthcheck(resolved[name]), f"{name} resolves to a healthcheck"


# --- references, profiles, pinned images -----------------------------------------------------------

PROFILES = {"batch", "demo", "observability"}


def test_profiles_are_known_and_default_services_never_need_a_profiled_one(compose):
    services = compose["services"]
    for name, svc in services.items():
        assert set(svc.get("profiles") or []) <= PROFILES, f"{name}: unknown profile"
        if svc.get("profiles"):
            continue
        for target in svc.get("depends_on") or {}:
            assert not services[target].get("profiles"), \
                f"{name} starts by default but depends on {target}, which only runs in a profile"


def test_every_network_reference_is_declared(compose):
    declared = set(compose.get("networks") or {}) | {"default"}
    for name, svc in compose["services"].items():
        assert set(svc.get("networks") or []) <= declared, name


def test_every_third_party_image_is_pinned(compose):
    for name, svc in compose["services"].items():
        if "build" in svc:
            continue
        image = svc["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest" and any(ch.isdigit() for ch in tag), f"{name}: {image} is not pinned"


def test_workers_scale_with_a_replica_count(compose):
    assert int(compose["services"]["worker"]["deploy"]["replicas"]) >= 1
    assert int(load_compose({"WARDWATCH_WORKER_REPLICAS": "3"})["services"]["worker"]["deploy"]["replicas"]) == 3


# --- the CDC path ----------------------------------------------------------------------------------


def _server_settings(command: list[str]) -> dict[str, str]:
    """`postgres -c name=value ...` -> {name: value}."""
    return dict(command[i + 1].split("=", 1) for i, word in enumerate(command) if word == "-c")


def test_postgres_runs_with_logical_wal_and_the_init_scripts(compose):
    postgres = compose["services"]["postgres"]
    assert postgres["command"][0] == "postgres"
    server = _server_settings(postgres["command"])
    assert server["wal_level"] == "logical"
    assert int(server["max_replication_slots"]) >= 1 and int(server["max_wal_senders"]) >= 1

    mounts = {v.split(":")[1]: v.split(":")[0] for v in postgres["volumes"] if v.startswith("./")}
    init = sorted((target, source) for target, source in mounts.items() if target.startswith("/docker-entrypoint-initdb.d/"))
    assert [source for _, source in init] == ["./deploy/postgres/ehr-schema.sql", "./deploy/postgres/debezium.sh"]
    # debezium.sh runs the SQL from its default path
    assert mounts["/opt/ehr/debezium.sql"] == "./deploy/postgres/debezium.sql"
    assert "/opt/ehr/debezium.sql" in (ROOT / "deploy" / "postgres" / "debezium.sh").read_text()


def test_the_connector_reaches_the_database_compose_creates(compose, monkeypatch):
    from wardwatch.deploy import EhrDatabase, connector_config

    services = compose["services"]
    db_env, connect_env = services["postgres"]["environment"], services["connect"]["environment"]
    init = services["connector-init"]
    config = connector_config(settings_from_env(init["environment"], monkeypatch),
                              EhrDatabase(host=init["environment"]["EHR_DB_HOST"], name=init["environment"]["EHR_DB_NAME"],
                                          user=init["environment"]["DEBEZIUM_DB_USER"]))["config"]

    assert config["database.hostname"] in services and config["database.dbname"] == db_env["POSTGRES_DB"]
    assert config["database.user"] == db_env["DEBEZIUM_DB_USER"]
    # the password is resolved inside Connect by its env config provider, from the postgres secret
    provider, variable = re.fullmatch(r"\$\{(\w+):(\w+)\}", config["database.password"]).groups()
    assert connect_env["CONNECT_CONFIG_PROVIDERS"] == provider
    assert connect_env[variable] == db_env["DEBEZIUM_DB_PASSWORD"]


def _apply_url(svc: dict) -> str:
    command = svc["command"]
    return command[command.index("--apply") + 1]


def _probed_port(svc: dict) -> int:
    """The port a service's http-ok.sh healthcheck probes."""
    test = svc["healthcheck"]["test"]
    return int(test[test.index("/opt/wardwatch/http-ok.sh") + 2])


def test_one_shot_inits_talk_to_the_healthy_services_they_wait_for(compose):
    from urllib.parse import urlsplit

    services = compose["services"]
    for init in ("connector-init", "subscription-init"):
        url = urlsplit(_apply_url(services[init]))
        assert url.hostname in services, f"{init} talks to unknown host {url.hostname}"
        assert services[init]["depends_on"][url.hostname]["condition"] == "service_healthy", init
        assert _probed_port(services[url.hostname]) == url.port, f"{init} and {url.hostname}'s healthcheck disagree"


def test_subscriptions_point_at_the_receiver_service(compose, monkeypatch):
    from wardwatch.deploy import receiver_url

    services = compose["services"]
    command = services["subscription-init"]["command"]
    host = command[command.index("--receiver") + 1]
    receiver = services[host]
    assert receiver["command"] == ["receiver"]
    assert services["subscription-init"]["depends_on"][host]["condition"] == "service_healthy"
    settings = settings_from_env(receiver["environment"], monkeypatch)
    assert settings.receiver_host == "0.0.0.0", "the receiver must listen on the compose network"
    assert receiver_url(settings, host) == f"http://receiver:{settings.receiver_port}/fhir/notifications"


def test_the_cds_service_takes_no_anonymous_calls_on_the_compose_network_unless_told(monkeypatch):
    """Every container on the network reaches the cds port: without the EHRs' keys it must not start
    (anyone could read any patient's risk by id), unless the operator sets the flag for a demo."""
    from streams.cds import AuthConfigError, load_client_auth

    settings = settings_from_env(load_compose()["services"]["cds"]["environment"], monkeypatch)
    assert settings.cds_host == "0.0.0.0"
    with pytest.raises(AuthConfigError, match="WARDWATCH_CDS_ALLOW_ANONYMOUS=true"):
        load_client_auth(settings)
    told = load_compose({"WARDWATCH_CDS_ALLOW_ANONYMOUS": "true"})["services"]["cds"]["environment"]
    assert load_client_auth(settings_from_env(told, monkeypatch)) is None


def test_the_receiver_takes_no_anonymous_notifications_on_the_compose_network_unless_told(monkeypatch):
    """Every container on the network reaches the receiver port: without WARDWATCH_RECEIVER_TOKEN it must
    not start (anyone could post readings into any patient's record), unless the operator says so."""
    from streams.receiver import open_receiver_refusal

    settings = settings_from_env(load_compose()["services"]["receiver"]["environment"], monkeypatch)
    assert settings.receiver_host == "0.0.0.0" and settings.receiver_token is None
    assert "WARDWATCH_RECEIVER_ALLOW_ANONYMOUS=true" in open_receiver_refusal(settings)
    told = load_compose({"WARDWATCH_RECEIVER_ALLOW_ANONYMOUS": "true"})["services"]["receiver"]["environment"]
    assert open_receiver_refusal(settings_from_env(told, monkeypatch)) is None
    assert open_receiver_refusal(settings.model_copy(update={"receiver_token": "s3cret"})) is None


# --- observability ---------------------------------------------------------------------------------


def test_prometheus_config_is_the_generated_one_and_scrapes_every_service(compose, monkeypatch):
    from wardwatch.deploy import render_prometheus_config

    prometheus = compose["services"]["prometheus"]
    source = next(v.split(":")[0] for v in prometheus["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro"))
    settings = settings_from_env(compose["services"]["worker"]["environment"], monkeypatch)
    assert (ROOT / source).read_text() == render_prometheus_config(settings), \
        "regenerate it: wardwatch deploy prometheus --output deploy/prometheus/prometheus.yml"

    import yaml

    scraped = {job["job_name"] for job in yaml.safe_load((ROOT / source).read_text())["scrape_configs"]}
    long_running = {n for n, s in wardwatch_services(compose).items() if not is_one_shot(s)} - NO_KAFKA
    assert scraped == long_running


# --- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_has_a_healthcheck_for_plain_docker_run():
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD \["python", "/opt/wardwatch/healthcheck.py"\]', DOCKERFILE.read_text(), re.M)


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (not on PyPI); https://github.com/hadolint/hadolint")
    result = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr



def test_the_connector_reaches_the_hospitals_database_set_in_env(monkeypatch):
    # docs/operations.md, "Against a real EHR": EHR_DB_HOST in .env points connector-init at the hospital's
    # database; hard-coded to `postgres`, the connector kept reading the demo database whatever .env said
    from typer.testing import CliRunner

    from wardwatch.cli import app

    init_env = load_compose({"EHR_DB_HOST": "ehr-db.hospital.example", "EHR_DB_PORT": "6432",
                             "EHR_DB_NAME": "clinical"})["services"]["connector-init"]["environment"]
    for name in [k for k in os.environ if k.startswith(ENV_PREFIX) or k.startswith(("EHR_DB_", "DEBEZIUM_DB_"))]:
        monkeypatch.delenv(name)
    result = CliRunner().invoke(app, ["deploy", "connector"], env={k: str(v) for k, v in init_env.items()})

    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["config"]
    assert (config["database.hostname"], config["database.port"], config["database.dbname"]) == (
        "ehr-db.hospital.example", "6432", "clinical")
