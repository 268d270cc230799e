"""Generates the Python protobuf and gRPC code (with mypy stubs) from protos/ into gen/.

The generated package mirrors the proto packages (coursesignup.<service>.v1), is never
committed and is excluded from lint and type checks. google/type comes from
googleapis-common-protos, so only our own packages are generated.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"


def main() -> int:
    import google.type  # noqa: F401  (googleapis-common-protos: google/type/*.proto)

    google_protos = pathlib.Path(sys.modules["google.type"].__path__[0]).parent.parent
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "coursesignup").rglob("*.proto"))
    shutil.rmtree(GEN, ignore_errors=True)
    GEN.mkdir()
    bin_dir = pathlib.Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{google_protos}",
        f"-I{well_known}",
        f"--python_out={GEN}",
        f"--grpc_python_out={GEN}",
        f"--mypy_out={GEN}",
        f"--mypy_grpc_out={GEN}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        print("protoc failed", file=sys.stderr)
        return code
    for directory in [GEN / "coursesignup", *(GEN / "coursesignup").rglob("*")]:
        if directory.is_dir():
            (directory / "__init__.py").touch()
            (directory / "py.typed").touch()
    # The gRPC service config (retries on UNAVAILABLE, deadlines) travels with the code,
    # for the services' own clients (libs.grpc_client); other clients read protos/.
    shutil.copy(PROTOS / "coursesignup" / "service_config.json", GEN / "coursesignup" / "service_config.json")
    print(f"generated {len(sources)} proto files into {GEN.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
