"""The README's table of error reasons is the list the code raises, with the right codes."""

from __future__ import annotations

import ast
import pathlib
import re

from libs import errors

ROOT = pathlib.Path(__file__).resolve().parents[2]
CODE = [*ROOT.glob("libs/**/*.py"), *ROOT.glob("services/**/*.py")]


def _documented() -> dict[str, str]:
    rows = re.findall(r"^\| `([A-Z_]+)` \| `([A-Z_]+)` \|", (ROOT / "README.md").read_text(), re.MULTILINE)
    return dict(rows)


def _raised() -> set[str]:
    """Every reason string the code passes as `reason=`, as a default_reason, or to status_for."""
    found: set[str] = set()
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "reason" and isinstance(node.value, ast.Constant):
                found.add(node.value.value)
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "default_reason"
                                                      for t in node.targets):
                found.add(ast.literal_eval(node.value))
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "status_for" \
                    and len(node.args) == 3 and isinstance(node.args[2], ast.Constant):
                found.add(node.args[2].value)
    # Reasons chosen by expression (InvalidArgument picks one of three).
    found |= {"INVALID_FILTER", "INVALID_PAGE_TOKEN", "FIELD_INVALID"}
    return found


def test_every_reason_the_code_raises_is_in_the_readme_table_and_nothing_else():
    documented, raised = _documented(), _raised()
    # Defaults of the generic classes are fallbacks no raise site should rely on.
    generic = {cls.default_reason for cls in (errors.ServiceError, errors.NotFound, errors.AlreadyExists,
                                              errors.FailedPrecondition, errors.PermissionDenied,
                                              errors.Unavailable)}
    assert raised - generic - set(documented) == set(), "reasons raised but not in the README"
    assert set(documented) - raised == set(), "reasons in the README that nothing raises"


def test_the_generic_fallback_reasons_are_not_used_by_any_raise_site():
    # Every NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION and UNAVAILABLE says which one it is.
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                name = getattr(node.exc.func, "id", "")
                if name in ("NotFound", "AlreadyExists", "FailedPrecondition", "Unavailable"):
                    assert any(k.arg == "reason" for k in node.exc.keywords), f"{path}:{node.lineno}"


def test_the_readme_gives_each_reason_the_status_its_class_has():
    documented = _documented()
    for cls in (errors.Unauthenticated, errors.DeadlineExceeded, errors.ResourceExhausted):
        assert documented[cls.default_reason] == cls.code.name
    for reason in ("SERVICE_STARTING", "QUEUE_UNAVAILABLE", "DATABASE_UNAVAILABLE"):
        assert documented[reason] == errors.Unavailable.code.name
