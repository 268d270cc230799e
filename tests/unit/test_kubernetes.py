"""deploy/kubernetes/ and deploy/aws/iam-policy.json, checked without a cluster or AWS.

Each manifest is validated against the Kubernetes OpenAPI schemas shipped by the PyPI
package kubernetes-validate (offline, strict: an unknown field fails), for the oldest and
the newest Kubernetes version this repository claims; kustomization.yaml must list every
manifest. The Deployments are checked against the services' own code: the console
script, the gRPC port and its native probes, every setting a service needs (its secrets
from the Secret), and nothing a service does not read. The IAM policy must allow exactly
the Kinesis operations the code calls (found in libs/ and services/ by their boto3 method
names), on the streams the ConfigMap's prefix names.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import pathlib
import secrets
import tomllib
from typing import Any

import botocore.session
import pytest
import yaml
from botocore import xform_name
from kubernetes_validate import utils as kubernetes_validate
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from libs.config import _check_secret
from libs.kinesis import ENROLLMENT_EVENTS_STREAM, REGISTRATIONS_STREAM
from services.enrollment.settings import EnrollmentSettings
from services.notifier.settings import NotifierSettings
from services.registration.settings import RegistrationSettings
from services.stats.settings import StatsSettings

ROOT = pathlib.Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
IAM_POLICY = ROOT / "deploy" / "aws" / "iam-policy.json"
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
SETTINGS_BY_SERVICE: dict[str, type[BaseSettings]] = {
    "registration": RegistrationSettings,
    "enrollment": EnrollmentSettings,
    "stats": StatsSettings,
    "notifier": NotifierSettings,
}
# gRPC probes are GA since 1.27; the oldest version still supported upstream, and the newest.
KUBERNETES_VERSIONS = ("1.33.0", kubernetes_validate.latest_version())
# Read by boto3 (credentials come from the pod's IAM role) or by the image's health check.
NOT_SETTINGS = {"GRPC_HEALTH_PORT"}
# Secrets that hold a URL with a password, or a password, rather than an HMAC key.
CREDENTIAL_SETTINGS = {"DATABASE_URL", "SMTP_PASSWORD", "ADMIN_TOKENS", "ADMIN_TOKEN"}


def manifests() -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(KUSTOMIZE_DIR.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for documents in manifests().values():
        for document in documents:
            key = (document["kind"], document["metadata"]["name"])
            assert key not in found, f"{key} is defined twice"
            found[key] = document
    return found


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((KUSTOMIZE_DIR / "kustomization.yaml").read_text())


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any], configmap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Variable name -> its source: {"value": ...}, {"secret": key} or {"configmap": key}."""
    env: dict[str, dict[str, Any]] = {}
    for source in container.get("envFrom") or []:
        assert source["configMapRef"]["name"] == configmap["metadata"]["name"]
        env |= {key: {"configmap": value} for key, value in configmap["data"].items()}
    for variable in container.get("env") or []:
        if "value" in variable:
            env[variable["name"]] = {"value": variable["value"]}
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = {"secret": ref["key"], "secret_name": ref["name"]}
    return env


def _secret_settings(settings_class: type[BaseSettings]) -> set[str]:
    """Settings declared as `Secret` (an HMAC key or similar, required, no default)."""
    return {
        name.upper()
        for name, field in settings_class.model_fields.items()
        if any(getattr(item, "func", None) is _check_secret for item in field.metadata)
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for name, documents in manifests().items():
        for document in documents:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name} ({document['kind']}) against Kubernetes {version}: {error.message} "
                            f"at {'.'.join(map(str, error.path))}")
            checked += 1
    assert checked >= 10


def test_the_validator_rejects_what_kubernetes_would() -> None:
    # Guards the test above against a validator that accepts anything.
    deployment = next(d for d in manifests()["enrollment.yaml"] if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    _container(broken)["readinessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take a number
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    unknown = json.loads(json.dumps(deployment))
    _container(unknown)["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest(kustomization: dict[str, Any]) -> None:
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(manifests())
    namespaces = [d for docs in manifests().values() for d in docs if d["kind"] == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == [kustomization["namespace"]]
    assert {image["name"] for image in kustomization["images"]} == {"course-signup"}


@pytest.mark.parametrize("name", SETTINGS_BY_SERVICE)
def test_each_deployment_runs_its_console_script_with_native_grpc_probes_on_its_port(
    resources: dict[tuple[str, str], dict[str, Any]], name: str
) -> None:
    deployment = resources[("Deployment", name)]
    container = _container(deployment)
    assert container["image"] == "course-signup"
    assert container["command"] == [f"coursesignup-{name}"] and f"coursesignup-{name}" in SCRIPTS
    settings_class = SETTINGS_BY_SERVICE[name]
    port = settings_class.model_fields[f"{name}_port"].default
    metrics_port = settings_class.model_fields[f"{name}_metrics_port"].default
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": port, "metrics": metrics_port}
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert env[f"{name.upper()}_PORT"] == str(port) and env["GRPC_HEALTH_PORT"] == str(port)
    assert env[f"{name.upper()}_METRICS_PORT"] == str(metrics_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port}, probe
    # The start (database, schema, streams) may take a while; liveness waits for it.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60

    service = resources[("Service", name)]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["grpc"]["port"] == port and by_name["grpc"]["targetPort"] == "grpc"
    assert by_name["grpc"]["appProtocol"] == "grpc"
    assert by_name["metrics"]["port"] == metrics_port


@pytest.mark.parametrize("name", SETTINGS_BY_SERVICE)
def test_each_deployment_has_resources_and_runs_as_non_root(
    resources: dict[tuple[str, str], dict[str, Any]], name: str
) -> None:
    pod = resources[("Deployment", name)]["spec"]["template"]["spec"]
    container = _container(resources[("Deployment", name)])
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["serviceAccountName"] == "course-signup"
    assert ("ServiceAccount", "course-signup") in resources
    shutdown = float(_env(container, resources[("ConfigMap", "course-signup-config")])
                     ["SHUTDOWN_GRACE_SECONDS"]["configmap"])
    assert pod["terminationGracePeriodSeconds"] > shutdown


@pytest.mark.parametrize("name", SETTINGS_BY_SERVICE)
def test_each_deployment_gets_its_settings_and_its_secrets_from_the_secret(
    resources: dict[tuple[str, str], dict[str, Any]], name: str
) -> None:
    settings_class = SETTINGS_BY_SERVICE[name]
    known = {field.upper() for field in settings_class.model_fields} | NOT_SETTINGS
    secret = resources[("Secret", "course-signup-secrets")]
    env = _env(_container(resources[("Deployment", name)]), resources[("ConfigMap", "course-signup-config")])
    unknown = set(env) - known
    assert not unknown, f"{name} is given {sorted(unknown)}, which {settings_class.__name__} does not read"

    required = _secret_settings(settings_class)
    assert "LOG_PSEUDONYM_KEY" in required  # guards _secret_settings itself
    required |= {"ADMIN_TOKENS"} | {field for field in known if field.endswith("_DATABASE_URL")}
    for variable in sorted(required):
        source = env.get(variable)
        assert source and "secret" in source, f"{name}: {variable} must come from the Secret"
    for variable, source in env.items():
        if "secret" in source:
            assert source["secret_name"] == secret["metadata"]["name"]
            assert source["secret"] in secret["stringData"], f"{variable}: no key {source['secret']} in the Secret"
        # Keys and passwords never sit in the ConfigMap or inline.
        if variable in required or any(variable.endswith(c) for c in CREDENTIAL_SETTINGS):
            assert "secret" in source, f"{name}: {variable} is not taken from the Secret"

    # Everything the Deployment sets is accepted by the service once the Secret's
    # placeholders are replaced, and refused while one is left.
    values = {
        variable.lower(): source.get("value") or source.get("configmap") or secret["stringData"][source["secret"]]
        for variable, source in env.items()
        if variable not in NOT_SETTINGS
    }
    placeholders = {key for key in values if key.upper() in required & _secret_settings(settings_class)}
    assert placeholders, name
    with pytest.raises(ValidationError):
        settings_class.model_validate(values)
    replaced = values | {key: secrets.token_urlsafe(32) for key in placeholders}
    settings = settings_class.model_validate(replaced)
    assert settings.model_dump()["bind_host"] == "0.0.0.0"


# ------------------------------------------------------------------------------- IAM


def kinesis_operations_the_code_calls() -> set[str]:
    """Kinesis API names (CamelCase) of every boto3 client method libs/ and services/ call."""
    model = botocore.session.get_session().get_service_model("kinesis")
    by_method = {xform_name(operation): operation for operation in model.operation_names}
    called = set()
    for package in ("libs", "services", "coursesignup_cli"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                if isinstance(func, ast.Attribute) and func.attr in by_method:
                    called.add(by_method[func.attr])
                # Waiters and paginators call an operation too.
                if isinstance(func, ast.Attribute) and func.attr in {"get_paginator", "get_waiter"} and node.args:
                    first = node.args[0]
                    assert isinstance(first, ast.Constant), f"{path}: a {func.attr} this test cannot read"
                    if func.attr == "get_paginator":
                        called.add(by_method[first.value])
                    else:
                        waiter = botocore.session.get_session().get_waiter_model("kinesis")
                        called.add(waiter.get_waiter(xform_name(first.value).title().replace("_", "")).operation)
    return called


@pytest.fixture(scope="module")
def policy() -> dict[str, Any]:
    return json.loads(IAM_POLICY.read_text())


def test_iam_policy_allows_exactly_the_kinesis_calls_the_code_makes(policy: dict[str, Any]) -> None:
    called = kinesis_operations_the_code_calls()
    # What the services are known to do: create and describe their streams, put records,
    # read shards. A new call fails here until the policy allows it.
    assert {"PutRecords", "GetRecords", "GetShardIterator", "ListShards"} <= called, called
    assert policy["Version"] == "2012-10-17"
    allowed: set[str] = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            assert "*" not in action, f"{action}: name each action"
            service, _, operation = action.partition(":")
            assert service == "kinesis", action
            allowed.add(operation)
    assert allowed == called, f"missing {sorted(called - allowed)}, not called {sorted(allowed - called)}"


def test_iam_policy_is_scoped_to_the_streams_the_configmap_names(
    policy: dict[str, Any], resources: dict[tuple[str, str], dict[str, Any]]
) -> None:
    prefix = resources[("ConfigMap", "course-signup-config")]["data"]["KINESIS_STREAM_PREFIX"]
    assert prefix, "a prefix scopes the policy to this system's streams"
    arn = "arn:aws:kinesis:us-east-1:123456789012:stream/{}"
    for statement in policy["Statement"]:
        patterns = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        for pattern in patterns:
            assert pattern.startswith("arn:aws:kinesis:") and ":stream/" in pattern, pattern
            for stream in (REGISTRATIONS_STREAM, ENROLLMENT_EVENTS_STREAM):
                assert fnmatch.fnmatchcase(arn.format(prefix + stream), pattern), (pattern, stream)
            assert not fnmatch.fnmatchcase(arn.format(REGISTRATIONS_STREAM), pattern), "other streams stay out"
            assert not fnmatch.fnmatchcase(arn.format(f"other-{prefix}{REGISTRATIONS_STREAM}"), pattern)
