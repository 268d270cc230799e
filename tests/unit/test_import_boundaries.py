"""The architecture's room boundaries, read from the source with `ast`.

Services talk by RPC and streams only, so no module under `services/<a>/` imports
`services.<b>` for another service b (absolute or relative imports alike). `libs/` is
what services share and knows none of them: it imports no `services.*` module and
names no service in a string constant (dict keys, assignments, arguments...);
docstrings and comments may mention them.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICES_DIR = ROOT / "services"
LIBS_DIR = ROOT / "libs"
SERVICE_NAMES = sorted(p.name for p in SERVICES_DIR.iterdir() if (p / "__init__.py").is_file())


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """Every module an import statement of the file names, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package):
                    found.append((node.lineno, "<relative import above the tree>"))
                    continue
                base = package[: len(package) - (node.level - 1)]
                if not base:
                    found.append((node.lineno, "<relative import above the tree>"))
                    continue
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from services import stats` imports the service package itself.
            if target == "services":
                found.extend((node.lineno, f"services.{alias.name}") for alias in node.names)
    return found


def python_files(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in directory.rglob("*.py") if "generated" not in p.parts)


def owner_service(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "services":
        return parts[1]
    return None


def cross_service_imports(path: pathlib.Path) -> list[str]:
    own = owner_service(module_name(path))
    violations = []
    for line, target in imported_modules(path):
        if target.startswith("<"):
            violations.append(f"{path.relative_to(ROOT)}:{line} {target}")
            continue
        other = owner_service(target)
        if other is not None and other != own:
            violations.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return violations


def service_imports_in_libs(path: pathlib.Path) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for line, target in imported_modules(path)
        if target == "services" or target.startswith("services.") or target.startswith("<")
    ]


def docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def service_names_in_libs(path: pathlib.Path) -> list[str]:
    """String constants (docstrings aside) that are a service's name, or hold one as a
    word of a dotted or slashed path, e.g. "stats" or "services.stats.settings"."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    docstrings = docstring_nodes(tree)
    names = set(SERVICE_NAMES)
    violations = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
            continue
        words = set(node.value.replace("/", ".").replace(":", ".").split("."))
        if node.value in names or ("services" in words and words & names):
            violations.append(f"{path.relative_to(ROOT)}:{node.lineno} names service {node.value!r}")
    return violations


def test_the_four_services_are_found() -> None:
    assert SERVICE_NAMES == ["enrollment", "notifier", "registration", "stats"]


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_no_service_imports_another_service(service: str) -> None:
    violations = [v for path in python_files(SERVICES_DIR / service) for v in cross_service_imports(path)]
    assert not violations, "services talk by RPC and streams only:\n" + "\n".join(violations)


def test_libs_import_no_service() -> None:
    violations = [v for path in python_files(LIBS_DIR) for v in service_imports_in_libs(path)]
    assert not violations, "libs/ must not depend on a service:\n" + "\n".join(violations)


def test_libs_name_no_service() -> None:
    violations = [v for path in python_files(LIBS_DIR) for v in service_names_in_libs(path)]
    assert not violations, "libs/ must not know a service by name:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("services/stats/x.py", "from services.enrollment.adapters import tables\n", 1),
        ("services/stats/x.py", "import services.enrollment\n", 1),
        ("services/stats/x.py", "from services import enrollment\n", 1),
        ("services/stats/a/x.py", "from ...enrollment import tables\n", 1),
        ("services/stats/a/x.py", "from ..adapters import tables\n", 0),
        ("services/stats/x.py", "from services.stats.adapters import tables\n", 0),
        ("services/stats/x.py", "from libs import db\n", 0),
    ],
)
def test_the_checker_catches_cross_service_imports(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str, expected: int
) -> None:
    # The checker itself can fail: planted imports are found, legitimate ones are not.
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    path = tmp_path / module
    path.parent.mkdir(parents=True)
    path.write_text(source)
    assert len(cross_service_imports(path)) == expected


def test_the_checker_catches_a_service_name_in_libs(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    path = tmp_path / "libs" / "x.py"
    path.parent.mkdir(parents=True)
    path.write_text(
        '"""Mentions stats in a docstring."""\n'
        'SERVICES = {"stats": 1}\nX = "services.notifier.settings"\nY = "statistics"\n'
    )
    assert len(service_names_in_libs(path)) == 2
