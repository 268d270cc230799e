"""`pip install .` installs the code: a wheel is built from the checkout and installed into
a new virtualenv, and what the package promises is checked there.

The wheel is built offline (`--no-build-isolation`, setuptools from the dev extra) from a
copy of the files the package is made of, so the checkout gets no build/ or egg-info.
The new virtualenv gets the wheel alone (`--no-deps`); the dependencies come from this
virtualenv's site-packages through a .pth line, which processes none of the .pth files
there, so the checkout (which `make install` puts on that path) is not importable from it:
a module missing from the wheel fails here instead of being found in the repository.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from collections.abc import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
SERVICES = ("registration", "enrollment", "stats", "notifier")
# Needed only by `make run` and the tests: never a runtime dependency.
DEV_ONLY = {"aiosmtpd", "honcho", "pytest", "grpcio-tools", "mypy-protobuf", "ruff", "mypy"}


def _requirement_name(requirement: str) -> str:
    for separator in "[=<>!~; ":
        requirement = requirement.split(separator, 1)[0]
    return requirement.lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    assert (ROOT / "gen" / "coursesignup" / "__init__.py").is_file(), "run `make gen` first"
    source = tmp_path_factory.mktemp("source")
    shutil.copy(ROOT / "pyproject.toml", source)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("libs", "services", "gen", "coursesignup_cli"):
        if (ROOT / package).is_dir():
            shutil.copytree(ROOT / package, source / package, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(dist), str(source)],
        check=True, capture_output=True, timeout=120,
    )
    (built,) = dist.glob("course_signup-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_files(wheel: pathlib.Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


@pytest.fixture(scope="module")
def installed(wheel: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """A new virtualenv with the wheel installed; returns its bin directory."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (pathlib.Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
         str(wheel)],
        check=True, capture_output=True, timeout=120,
    )
    yield env_dir / "bin"


def _clean_env() -> dict[str, str]:
    # Nothing of the test session's environment (its PYTHONPATH, the secrets conftest sets).
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(bin_dir: pathlib.Path, *args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=_clean_env(), capture_output=True,
                          text=True, timeout=60)


def test_the_wheel_holds_the_code_the_generated_protos_and_their_data(wheel_files: set[str]) -> None:
    for module in ("libs/operator.py", "libs/worker.py", "services/registration/supervisor.py",
                   "services/enrollment/bootstrap.py", "services/stats/bootstrap.py", "services/notifier/bootstrap.py"):
        assert module in wheel_files, module
    generated = {name for name in wheel_files if name.startswith("coursesignup/")}
    for service in (*SERVICES, "events"):
        stem = f"coursesignup/{service}/v1/{'events' if service == 'events' else service}"
        assert f"{stem}_pb2.py" in generated, stem
        assert f"{stem}_pb2.pyi" in generated, stem  # typed: the stubs and py.typed travel too
    assert {"coursesignup/py.typed", "coursesignup/service_config.json"} <= generated
    assert any(name.startswith("services/notifier/templates/en/") for name in wheel_files), "email templates"
    if (ROOT / "coursesignup_cli").is_dir():
        assert "coursesignup_cli/__main__.py" in wheel_files
    # Tests, benchmarks and dev tools are not part of the package.
    assert not any(name.startswith(("tests/", "benchmarks/", "dev/", "scripts/")) for name in wheel_files)


def test_the_wheel_holds_every_file_of_the_packages(wheel_files: set[str]) -> None:
    # Modules and their data (templates, migrations and their template) alike: a file
    # left out works from the checkout and fails only once installed.
    for package in ("libs", "services", "coursesignup_cli"):
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                name = path.relative_to(ROOT).as_posix()
                assert name in wheel_files, f"{name} is not in the wheel"


def test_the_wheel_does_not_shadow_googleapis_common_protos(wheel_files: set[str]) -> None:
    # google.rpc / google.type come from googleapis-common-protos; a google/ package in the
    # wheel would replace (or half-replace) its modules on install.
    assert not any(name.startswith("google/") for name in wheel_files), sorted(
        name for name in wheel_files if name.startswith("google/"))


def test_runtime_dependencies_exclude_the_development_tools() -> None:
    runtime = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    dev = {_requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert not runtime & DEV_ONLY, runtime & DEV_ONLY
    assert {"aiosmtpd", "honcho"} <= dev, "make run needs them from the dev extra"
    for requirement in [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["dev"]]:
        assert "==" in requirement, f"{requirement} is not pinned"


def test_every_service_and_the_operator_have_a_console_script(wheel: pathlib.Path) -> None:
    expected = {f"coursesignup-{name}" for name in (*SERVICES, "operator")}
    assert expected <= set(SCRIPTS)
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = (n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = archive.read(entry_points).decode()
    for script in expected:
        assert f"{script} = {SCRIPTS[script]}" in text, script


def test_installed_console_scripts_run_from_the_installed_package(
    installed: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    result = _run(installed, "coursesignup-operator", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "leases" in result.stdout and "dead-letters" in result.stdout, result.stdout

    for name in SERVICES:
        assert (installed / f"coursesignup-{name}").is_file(), name

    probe = _run(installed, "python", "-c", (
        "import coursesignup.registration.v1.registration_pb2 as r, google.rpc.status_pb2 as s, libs, services, "
        "libs.grpc_client as g, services.notifier.adapters.templates as t, json; "
        "print(json.dumps([r.__file__, s.__file__, libs.__file__, services.__file__, "
        "bool(g.__name__), t.TEMPLATES_DIR.is_dir(), "
        "sorted(e.name for e in __import__('importlib.metadata').metadata.entry_points("
        "group='course_signup.services'))]))"), cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    generated, google_rpc, libs_file, services_file, _, templates, described = json.loads(probe.stdout)
    # The operator command finds the services through the installed entry points.
    assert set(described) == set(PYPROJECT["project"]["entry-points"]["course_signup.services"]), described
    site = str(installed.parent / "lib")
    for path in (generated, libs_file, services_file):
        assert path.startswith(site), f"{path} is not the installed copy (the checkout leaked onto the path?)"
    assert "google/rpc/status_pb2.py" in google_rpc and not google_rpc.startswith(site)
    assert templates, "the notifier's templates are not installed beside it"


def test_a_service_console_script_starts_the_service_entry_point(
    installed: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # Without its secrets a service refuses to start naming the variable (exit 2): proof
    # that the script reached the service's settings, without starting a server.
    for name, secret in [("registration", "REGISTRATION_ID_SECRET"), ("enrollment", "ENROLLMENT_PAGE_TOKEN_SECRET"),
                         ("stats", "STATS_PAGE_TOKEN_SECRET"), ("notifier", "LOG_PSEUDONYM_KEY")]:
        result = _run(installed, f"coursesignup-{name}", cwd=tmp_path)
        assert result.returncode == 2, (name, result.returncode, result.stderr[-2000:])
        assert f"configuration error: {secret}" in result.stderr, (name, result.stderr)
