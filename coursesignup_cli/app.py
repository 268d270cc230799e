"""The `coursesignup` commands (typer): the catalogue, sign-ups, statistics, rosters and
emails, each a gRPC call or a few to the services. Results go to stdout, progress and
errors to stderr; a failed call prints its status and reason and exits 1, never a traceback.

Exit codes: 0 done, 1 a call failed, 2 a mistake in the command or its file, 3 `watch`
saw no decision in time, 130 interrupted.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import time
import uuid
from typing import Annotated, Any

import grpc
import typer
from google.type import date_pb2
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coursesignup.enrollment.v1 import enrollment_pb2
from coursesignup.notifier.v1 import notifier_pb2
from coursesignup.registration.v1 import registration_pb2
from coursesignup.stats.v1 import stats_pb2
from coursesignup_cli import render
from coursesignup_cli.catalogue import CatalogueFileError, LoadReport, load_catalogue, read_catalogue
from coursesignup_cli.connection import Clients, Targets, TlsFiles, UsageError, pages, resolve_token
from coursesignup_cli.errors import describe
from coursesignup_cli.watch import DECIDED, FINAL, RegistrationWatcher, StreamingWatcher, WatchTimeout

EXIT_CALL_FAILED, EXIT_USAGE, EXIT_WATCH_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 130

out = Console(soft_wrap=True)
if not out.is_terminal and not os.environ.get("COLUMNS"):
    out = Console(soft_wrap=True, width=200)  # piped: tables not folded to rich's default 80 columns
err = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="coursesignup",
    help="Course sign-up from the terminal: load the catalogue, sign students up and watch the "
    "decision, see age statistics, rosters and emails. Talks gRPC to the four services.\n\n"
    "Exit codes: 0 done, 1 a call failed (its status and reason are printed), 2 a mistake in "
    "the command or its file, 3 watch saw no decision in time, 130 interrupted.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
catalogue_app = typer.Typer(help="The course catalogue (campuses and courses).", no_args_is_help=True)
stats_app = typer.Typer(help="Age statistics, with the age histogram drawn in the terminal.", no_args_is_help=True)
app.add_typer(catalogue_app, name="catalogue")
app.add_typer(stats_app, name="stats")


@app.callback()
def connect(
    ctx: typer.Context,
    registration: Annotated[str, typer.Option(envvar="REGISTRATION_TARGET", help="registration service")] =
        "127.0.0.1:50051",
    enrollment: Annotated[str, typer.Option(envvar="ENROLLMENT_TARGET", help="enrollment service")] =
        "127.0.0.1:50052",
    stats: Annotated[str, typer.Option(envvar="STATS_TARGET", help="stats service")] = "127.0.0.1:50053",
    notifier: Annotated[str, typer.Option(envvar="NOTIFIER_TARGET", help="notifier service")] = "127.0.0.1:50054",
    ca_file: Annotated[str | None, typer.Option(envvar="TLS_CA_FILE", help="PEM CA to trust: TLS")] = None,
    cert_file: Annotated[str | None, typer.Option(help="PEM client certificate, for mutual TLS")] = None,
    key_file: Annotated[str | None, typer.Option(help="PEM client key, for mutual TLS")] = None,
    token: Annotated[str | None, typer.Option(envvar="ADMIN_TOKEN", show_envvar=True,
                                              help="admin token for catalogue writes, rosters, notifications")] = None,
    token_file: Annotated[str | None, typer.Option(
        envvar="ADMIN_TOKEN_FILE", help="file holding the admin token [default: var/admin-token if present]")] = None,
    timeout: Annotated[float, typer.Option(help="deadline of each call, in seconds")] = 10.0,
) -> None:
    """Targets, TLS and the admin token, shared by every command."""
    clients = Clients(Targets(registration, enrollment, stats, notifier),
                      TlsFiles(ca_file, cert_file, key_file), resolve_token(token, token_file), timeout)
    ctx.obj = clients
    ctx.call_on_close(clients.close)


def _clients(ctx: typer.Context) -> Clients:
    clients = ctx.obj
    assert isinstance(clients, Clients)
    return clients


def _parse_date(value: str | None, option: str) -> date_pb2.Date | None:
    if value is None:
        return None
    try:
        date = dt.date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{option}: expected a date as YYYY-MM-DD, got {value!r}") from None
    return date_pb2.Date(year=date.year, month=date.month, day=date.day)


# --- the catalogue ---------------------------------------------------------------------

@catalogue_app.command("load")
def catalogue_load(
    ctx: typer.Context,
    file: Annotated[pathlib.Path, typer.Argument(help="a .csv or .yaml catalogue", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count what would change, write nothing")] = False,
) -> None:
    """Create the campuses and courses the file lists that are missing, update a course's
    name or capacity where they differ, leave the rest: loading twice changes nothing.

    CSV columns: campus_id,campus_name,course_id,course_name,capacity (one row per course).
    YAML: campuses: [{campus_id, name}], courses: [{course_id, campus_id, name, capacity}].
    """
    clients = _clients(ctx)
    catalogue = read_catalogue(file)
    report = LoadReport()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err)
    try:
        with progress:
            task = progress.add_task(f"loading {file.name}", total=len(catalogue))
            load_catalogue(clients.enrollment, catalogue, clients.admin(), clients.timeout, report,
                           advance=lambda what: progress.update(task, advance=1, description=what), dry_run=dry_run)
    finally:
        _print_load_report(report, dry_run)


def _print_load_report(report: LoadReport, dry_run: bool) -> None:
    table = Table(title="catalogue load (dry run: nothing written)" if dry_run else "catalogue load")
    for column in ("", "created", "updated", "unchanged"):
        table.add_column(column, justify="right" if column else "left")
    for name, counts in (("campuses", report.campuses), ("courses", report.courses)):
        table.add_row(name, str(counts.created), str(counts.updated), str(counts.unchanged))
    out.print(table)
    for warning in report.warnings:
        err.print(f"warning: {warning}", style="yellow", highlight=False)
    if not report.changed:
        out.print("nothing to change", highlight=False)
    else:
        out.print("would change the catalogue" if dry_run else "changed the catalogue", highlight=False)


@catalogue_app.command("list")
def catalogue_list(
    ctx: typer.Context,
    campus: Annotated[str | None, typer.Option(help="only this campus's courses")] = None,
) -> None:
    """The courses with their capacity and enrolled count."""
    clients = _clients(ctx)
    request = enrollment_pb2.ListCoursesRequest(campus_id=campus or "", page_size=1000)
    table = Table(title="courses")
    for column in ("course", "campus", "name", "capacity", "enrolled"):
        table.add_column(column, justify="right" if column in {"capacity", "enrolled"} else "left")
    for course in pages(clients.enrollment.ListCourses, request, "courses", timeout=clients.timeout):
        table.add_row(course.course_id, course.campus_id, course.name, str(course.capacity),
                      str(course.enrolled_count))
    out.print(table)


# --- sign-ups ----------------------------------------------------------------------------

@app.command()
def register(
    ctx: typer.Context,
    course: Annotated[str, typer.Option(help="course id", show_default=False)],
    name: Annotated[str, typer.Option(help="the student's name", show_default=False)],
    email: Annotated[str, typer.Option(help="the student's email address", show_default=False)],
    birth_date: Annotated[str, typer.Option(help="YYYY-MM-DD", show_default=False)],
    locale: Annotated[str, typer.Option(help="language of the emails: en or pt-BR")] = "",
    request_id: Annotated[str | None, typer.Option(
        help="retry key (AIP-155): the same sign-up sent again with it is not a second one [default: new]")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="then watch it until it is decided")] = False,
    watch_timeout: Annotated[float, typer.Option(help="with --watch: seconds to wait for the decision")] = 120.0,
) -> None:
    """Sign a student up for a course; prints the registration id (PENDING until decided)."""
    clients = _clients(ctx)
    reply = clients.registration.Register(registration_pb2.RegisterRequest(
        name=name, email=email, course_id=course, birth_date=_parse_date(birth_date, "--birth-date"),
        request_id=request_id or str(uuid.uuid4()), locale=locale,
    ), timeout=clients.timeout)
    out.print(f"registration_id: {reply.registration_id}", highlight=False)
    out.print("status: ", render.registration_status(reply.status), sep="")
    if watch:
        _watch(StreamingWatcher(clients.registration), reply.registration_id, watch_timeout)


@app.command()
def watch(
    ctx: typer.Context,
    registration_id: Annotated[str, typer.Argument(show_default=False)],
    timeout: Annotated[float, typer.Option("--for", help="seconds to wait for the decision")] = 120.0,
    follow: Annotated[bool, typer.Option(
        "--follow", help="past ENROLLED too, until CANCELLED (or --for runs out)")] = False,
) -> None:
    """Follow a registration until it is decided: ENROLLED, DECLINED_* or CANCELLED; a
    WAITLISTED one is shown with each new position while it waits (--for runs out: exit 3;
    Ctrl-C: 130). Uses the WatchRegistration stream: each change is shown as it happens.
    """
    clients = _clients(ctx)
    _watch(StreamingWatcher(clients.registration, until=FINAL if follow else DECIDED), registration_id, timeout)


def _watch(watcher: RegistrationWatcher, registration_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        with out.status("waiting for the decision..."):
            for registration in watcher.updates(registration_id, deadline):
                when = render.time_text(registration.decide_time, registration.HasField("decide_time"))
                about = [f"course {registration.course_id}"] if registration.course_id else []
                if registration.status == registration_pb2.REGISTRATION_STATUS_WAITLISTED:
                    about.append(f"position {registration.waitlist_position}")
                about += [f"decided {when} UTC"] if when else []
                out.print(f"{dt.datetime.now(dt.UTC):%H:%M:%S} {registration.registration_id} ",
                          render.registration_status(registration.status),
                          f" ({', '.join(about)})" if about else "", sep="", highlight=False)
    except WatchTimeout as error:
        err.print(f"no decision within {timeout:g} s: {error}", style="yellow", highlight=False)
        raise typer.Exit(EXIT_WATCH_TIMEOUT) from None
    except KeyboardInterrupt:
        err.print("stopped watching (the registration goes on)", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None


# --- statistics, rosters, emails ---------------------------------------------------------

AsOf = Annotated[str | None, typer.Option("--as-of", help="ages on this date, YYYY-MM-DD [default: today, UTC]")]


def _show_stats(stats: Any) -> None:
    out.print(render.stats_table(stats))
    if stats.student_count:
        out.print(render.histogram(stats.age_histogram))
    else:  # the stats service learns of a course or campus from its first enrollment
        out.print("no students enrolled (yet)", highlight=False)


@stats_app.command("course")
def stats_course(ctx: typer.Context, course_id: Annotated[str, typer.Argument(show_default=False)],
                 as_of: AsOf = None) -> None:
    """A course's enrolled students: count, ages, and the age histogram."""
    clients = _clients(ctx)
    _show_stats(clients.stats.GetCourseStats(stats_pb2.GetCourseStatsRequest(
        course_id=course_id, as_of=_parse_date(as_of, "--as-of"), view=stats_pb2.AGE_STATS_VIEW_FULL),
        timeout=clients.timeout))


@stats_app.command("campus")
def stats_campus(ctx: typer.Context, campus_id: Annotated[str, typer.Argument(show_default=False)],
                 as_of: AsOf = None) -> None:
    """A campus's distinct students (by email): count, ages, and the age histogram."""
    clients = _clients(ctx)
    _show_stats(clients.stats.GetCampusStats(stats_pb2.GetCampusStatsRequest(
        campus_id=campus_id, as_of=_parse_date(as_of, "--as-of"), view=stats_pb2.AGE_STATS_VIEW_FULL),
        timeout=clients.timeout))


@stats_app.command("overall")
def stats_overall(ctx: typer.Context, as_of: AsOf = None) -> None:
    """Every distinct student: count, ages, and the age histogram."""
    clients = _clients(ctx)
    _show_stats(clients.stats.GetOverallStats(stats_pb2.GetOverallStatsRequest(
        as_of=_parse_date(as_of, "--as-of"), view=stats_pb2.AGE_STATS_VIEW_FULL), timeout=clients.timeout))


@app.command()
def roster(
    ctx: typer.Context,
    course_id: Annotated[str, typer.Argument(show_default=False)],
    filter: Annotated[str, typer.Option(help='AIP-160 filter, e.g. \'age >= 30\'')] = "",
    order_by: Annotated[str, typer.Option(help="AIP-132 order, e.g. 'age desc'")] = "",
    limit: Annotated[int, typer.Option(help="at most this many students (0: all)")] = 0,
    as_of: AsOf = None,
) -> None:
    """A course's enrolled students (personal data: needs the admin token)."""
    clients = _clients(ctx)
    request = stats_pb2.ListEnrollmentsRequest(course_id=course_id, filter=filter, order_by=order_by,
                                               page_size=min(limit, 1000) if limit else 1000,
                                               as_of=_parse_date(as_of, "--as-of"))
    enrollments, as_of_date = [], None
    while True:
        reply = clients.stats.ListEnrollments(request, metadata=clients.admin(), timeout=clients.timeout)
        enrollments += list(reply.enrollments)
        as_of_date = reply.as_of
        if not reply.next_page_token or (limit and len(enrollments) >= limit):
            break
        request.page_token = reply.next_page_token
    shown = enrollments[:limit] if limit else enrollments
    out.print(render.roster_table(course_id, shown, as_of_date))
    out.print(f"{len(shown)} student(s)", highlight=False)


@app.command()
def notifications(ctx: typer.Context, registration_id: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """The emails of a registration: kind, recipient, delivery status (needs the admin token)."""
    clients = _clients(ctx)
    reply = clients.notifier.ListNotifications(notifier_pb2.ListNotificationsRequest(
        registration_id=registration_id), metadata=clients.admin(), timeout=clients.timeout)
    out.print(render.notifications_table(registration_id, reply.notifications))


def run() -> None:
    """The command with its errors told, not thrown: the status and reason of a failed
    call (exit 1), a mistake in the command or its file (exit 2)."""
    try:
        app()
    except grpc.RpcError as error:
        for line in describe(error).lines():
            err.print(line, style="red", highlight=False, markup=False)
        raise SystemExit(EXIT_CALL_FAILED) from None
    except (UsageError, CatalogueFileError) as error:
        err.print(f"error: {error}", style="red", highlight=False, markup=False)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
