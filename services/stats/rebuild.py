"""`python -m services.stats.rebuild`: rebuilds the stats read model from the enrollment
service's records (an operator's command).

Streams every enrollment from the enrollment service at ENROLLMENT_TARGET (its
ExportEnrollments call, with the admin token ADMIN_TOKEN: the export carries personal data)
and rewrites the read model in STATS_DATABASE_URL in one transaction, printing progress.
An export stream that drops once under way is resumed after the last page received,
with a log line per resume (see adapters/enrollment_export.py).
Procedure: stop the stats service, run this, start the service again; it resumes from
its shard checkpoints, and what it reads again that the rebuild already counted
changes nothing (see service_layer/rebuild.py for why nothing is lost either).
"""

from __future__ import annotations

import argparse
import logging
import sys

import grpc

from libs import grpc_client
from libs.config import load_settings
from libs.db import make_engine
from libs.logs import JsonFormatter
from services.stats.adapters import enrollment_export
from services.stats.adapters.enrollment_export import PAGE_SIZE, EnrollmentExport
from services.stats.service_layer.rebuild import CHUNK_SIZE, WorkersStillRunning, rebuild_from_enrollments
from services.stats.settings import StatsSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.stats.rebuild",
        description="Rebuilds the stats read model from the enrollment service (stop the stats service first).",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild even while stats workers hold leases (they are fenced out until it commits)",
    )
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="enrollments per step (default %(default)s)")
    parser.add_argument(
        "--page-size", type=int, default=PAGE_SIZE, help="enrollments per exported page (default %(default)s)"
    )
    args = parser.parse_args(argv)
    settings = load_settings(StatsSettings)
    stats_engine = make_engine(settings.stats_database_url)
    source = EnrollmentExport(settings.enrollment_target, settings.admin_token, page_size=args.page_size,
                              channel=lambda target: grpc_client.channel(target, settings))
    shown: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        # One line per stage and 5 % step, whatever the chunk size.
        if shown.get(stage, -1) < percent // 5 or done == total:
            shown[stage] = percent // 5
            print(f"{stage}: {done}/{total} ({percent}%)", file=sys.stderr, flush=True)

    # The export's line per resume, on stderr with the progress lines.
    resume_lines = logging.StreamHandler(sys.stderr)
    resume_lines.setFormatter(JsonFormatter("stats-rebuild"))
    export_log = logging.getLogger(enrollment_export.__name__)
    export_log.addHandler(resume_lines)
    try:
        summary = rebuild_from_enrollments(stats_engine, source, progress, force=args.force, chunk_size=args.chunk_size)
    except WorkersStillRunning as error:
        print(f"not rebuilt: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(
            f"not rebuilt (nothing changed): the enrollment service at {settings.enrollment_target} answered "
            f"{error.code().name}: {error.details()}"
            + (f" (after reopening the dropped export stream {source.resumes} time(s))" if source.resumes else ""),
            file=sys.stderr,
        )
        return 3
    finally:
        export_log.removeHandler(resume_lines)
        stats_engine.dispose()
    print(
        f"rebuilt the stats read model from {summary.enrollments} enrollments "
        f"({summary.tombstones_kept} removed enrollments kept as tombstones) in {summary.seconds:.1f} s"
        + (f" (export stream reopened {source.resumes} time(s) after drops)" if source.resumes else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
