"""The `coursesignup` command for people, run as the installed console script against a
running mesh (kinesalite, a real SMTP server, the four services as processes)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from coursesignup.stats.v1 import stats_pb2, stats_pb2_grpc
from tests import helpers
from tests.helpers import wait_until
from tests.mesh import Mesh, running_mesh, smtp_server

pytestmark = pytest.mark.e2e

# The script `pip install -e .` (make install) puts beside the interpreter running the tests.
CLI = pathlib.Path(sys.executable).parent / "coursesignup"

CATALOGUE_CSV = """campus_id,campus_name,course_id,course_name,capacity
cli-north,CLI North Campus,cli101,Terminal Arts,3
cli-north,CLI North Campus,cli102,Shell Poetry,10
cli-south,CLI South Campus,,,
"""

# The same catalogue with one capacity raised and one course more.
CATALOGUE_YAML = """campuses:
  - {campus_id: cli-north, name: CLI North Campus}
  - {campus_id: cli-south, name: CLI South Campus}
courses:
  - {course_id: cli101, campus_id: cli-north, name: Terminal Arts, capacity: 3}
  - {course_id: cli102, campus_id: cli-north, name: Shell Poetry, capacity: 12}
  - {course_id: cli201, campus_id: cli-south, name: Pipes and Filters, capacity: 5}
"""

# Ages on AS_OF: 29, 29, 32 enrolled (cli101 has 3 seats); the fourth is declined.
AS_OF = "2025-01-01"
STUDENTS = [
    ("Ada Terminal", "ada.cli@example.com", "1995-06-01"),
    ("Brian Shell", "brian.cli@example.com", "1995-02-01"),
    ("Cleo Prompt", "cleo.cli@example.com", "1992-03-01"),
    ("Dan Late", "dan.cli@example.com", "1990-05-05"),
]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, kinesis_endpoint: str) -> Iterator[Mesh]:
    if not CLI.exists():
        pytest.fail(f"{CLI} is not installed: run make install (pip install -e .)")
    with smtp_server() as (smtp_port, _):
        with running_mesh(tmp_path_factory.mktemp("cli-mesh"), kinesis_endpoint, smtp_port) as running:
            yield running


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    # Not the checkout: the command must not find a developer's var/admin-token there.
    return tmp_path_factory.mktemp("cli-cwd")


def cli(
    mesh: Mesh, cwd: pathlib.Path, *args: str, token: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in {"ADMIN_TOKEN", "ADMIN_TOKEN_FILE"}}
    env.update({
        "REGISTRATION_TARGET": mesh.target("registration"),
        "ENROLLMENT_TARGET": mesh.target("enrollment"),
        "STATS_TARGET": mesh.target("stats"),
        "NOTIFIER_TARGET": mesh.target("notifier"),
        "COLUMNS": "200",  # rich wraps tables to the terminal width
    })
    if token:
        env["ADMIN_TOKEN"] = helpers.ADMIN_TOKEN
    return subprocess.run([str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def load_counts(output: str) -> dict[str, tuple[int, int, int]]:
    """The created/updated/unchanged counts of the load report table."""
    counts = {}
    for kind in ("campuses", "courses"):
        match = re.search(rf"{kind}\W+(\d+)\W+(\d+)\W+(\d+)", output)
        assert match, output
        counts[kind] = (int(match[1]), int(match[2]), int(match[3]))
    return counts


@pytest.fixture(scope="module")
def catalogue(mesh: Mesh, workdir: pathlib.Path) -> str:
    (workdir / "catalogue.csv").write_text(CATALOGUE_CSV)
    (workdir / "catalogue.yaml").write_text(CATALOGUE_YAML)
    return ok(cli(mesh, workdir, "catalogue", "load", "catalogue.csv"))


def course(mesh: Mesh, course_id: str) -> Any:
    with grpc.insecure_channel(mesh.target("enrollment")) as channel:
        return enrollment_pb2_grpc.EnrollmentServiceStub(channel).GetCourse(
            enrollment_pb2.GetCourseRequest(course_id=course_id), timeout=10)


def test_loading_a_catalogue_twice_changes_nothing_the_second_time(mesh, workdir, catalogue):
    assert load_counts(catalogue) == {"campuses": (2, 0, 0), "courses": (2, 0, 0)}
    before = course(mesh, "cli102")
    again = ok(cli(mesh, workdir, "catalogue", "load", "catalogue.csv"))
    assert load_counts(again) == {"campuses": (0, 0, 2), "courses": (0, 0, 2)}
    assert "nothing to change" in again
    assert course(mesh, "cli102").update_time == before.update_time, "the service saw no update"

    dry = ok(cli(mesh, workdir, "catalogue", "load", "--dry-run", "catalogue.yaml"))
    assert load_counts(dry) == {"campuses": (0, 0, 2), "courses": (1, 1, 1)} and "would change" in dry
    assert course(mesh, "cli102").capacity == 10, "a dry run writes nothing"
    changed = ok(cli(mesh, workdir, "catalogue", "load", "catalogue.yaml"))
    assert load_counts(changed) == {"campuses": (0, 0, 2), "courses": (1, 1, 1)}
    assert load_counts(ok(cli(mesh, workdir, "catalogue", "load", "catalogue.yaml"))) == {
        "campuses": (0, 0, 2), "courses": (0, 0, 3)}
    listing = ok(cli(mesh, workdir, "catalogue", "list"))
    assert re.search(r"cli102\W+cli-north\W+Shell Poetry\W+12\W+0", listing), listing
    assert re.search(r"cli201\W+cli-south\W+Pipes and Filters\W+5\W+0", listing), listing


def register(mesh: Mesh, workdir: pathlib.Path, name: str, email: str, birth: str, *extra: str) -> tuple[str, str]:
    output = ok(cli(mesh, workdir, "register", "--course", "cli101", "--name", name, "--email", email,
                    "--birth-date", birth, *extra, timeout=60))
    match = re.search(r"^registration_id: (\S+)$", output, re.MULTILINE)
    assert match, output
    return match[1], output


def admin_stubs(mesh: Mesh) -> tuple[Any, Any, grpc.Channel, grpc.Channel]:
    stats_channel = grpc.insecure_channel(mesh.target("stats"))
    notifier_channel = grpc.insecure_channel(mesh.target("notifier"))
    return (stats_pb2_grpc.StatsServiceStub(stats_channel), notifier_pb2_grpc.NotifierServiceStub(notifier_channel),
            stats_channel, notifier_channel)


def test_a_sign_up_is_watched_until_decided_then_shows_in_stats_roster_and_emails(mesh, workdir, catalogue):
    ids = []
    for name, email, birth in STUDENTS[:3]:
        registration_id, output = register(mesh, workdir, name, email, birth)
        assert "status: PENDING" in output
        ids.append(registration_id)
    for registration_id in ids:
        watched = ok(cli(mesh, workdir, "watch", registration_id, "--for", "45", timeout=60))
        assert re.search(rf"{re.escape(registration_id)} ENROLLED \(course cli101, decided ", watched), watched
    # The fourth, watched by register itself, finds the course full.
    late_id, late = register(mesh, workdir, *STUDENTS[3], "--watch", "--watch-timeout", "45")
    assert re.search(rf"{re.escape(late_id)} DECLINED_FULL \(course cli101", late), late

    stats, notifier, *channels = admin_stubs(mesh)
    try:
        wait_until(lambda: stats.GetCourseStats(stats_pb2.GetCourseStatsRequest(course_id="cli101")).student_count
                   == 3, what="the stats of cli101 to count 3 students")
        wait_until(lambda: {n.status for n in notifier.ListNotifications(
            notifier_pb2.ListNotificationsRequest(registration_id=late_id), metadata=helpers.ADMIN_METADATA
        ).notifications} == {notifier_pb2.DELIVERY_STATUS_SENT} and len(notifier.ListNotifications(
            notifier_pb2.ListNotificationsRequest(registration_id=late_id), metadata=helpers.ADMIN_METADATA
        ).notifications) == 2, what="both emails of the declined student sent")
    finally:
        for channel in channels:
            channel.close()

    course = ok(cli(mesh, workdir, "stats", "course", "cli101", "--as-of", AS_OF))
    assert f"courses/cli101 on {AS_OF}" in course
    assert re.search(r"\b3\W+29\W+32\W+30\.00\W+29\b", course), course  # count, min, max, mean, median
    bars = {int(m[1]): (len(m[2]), int(m[3])) for m in re.finditer(r"^\s*(\d+)\s+(█*)\s+(\d+)\s*$", course, re.M)}
    assert bars == {29: (40, 2), 30: (0, 0), 31: (0, 0), 32: (20, 1)}, course

    campus = ok(cli(mesh, workdir, "stats", "campus", "cli-north", "--as-of", AS_OF))
    assert f"campuses/cli-north on {AS_OF}" in campus and re.search(r"\b3\W+29\W+32\b", campus), campus

    roster = ok(cli(mesh, workdir, "roster", "cli101", "--order-by", "age desc", "--as-of", AS_OF))
    assert "3 student(s)" in roster
    names = [name for name, _, _ in STUDENTS[:3] if name in roster]
    assert len(names) == 3 and "Dan Late" not in roster, roster
    assert roster.index("Cleo Prompt") < roster.index("Ada Terminal"), "oldest first"
    assert re.search(r"cleo\.cli@example\.com\W+32\W+1992-03-01", roster), roster

    emails = ok(cli(mesh, workdir, "notifications", late_id))
    assert re.search(r"RECEIVED\W+dan\.cli@example\.com\W+SENT", emails), emails
    assert re.search(r"DECLINED_FULL\W+dan\.cli@example\.com\W+SENT", emails), emails


def test_the_admin_token_is_read_from_a_token_file(mesh, workdir, catalogue):
    token_file = workdir / "admin-token"
    token_file.write_text(helpers.ADMIN_TOKEN + "\n")
    output = ok(cli(mesh, workdir, "--token-file", str(token_file), "catalogue", "load", "catalogue.csv",
                    token=False))
    assert "courses" in output


def test_a_failed_call_prints_its_status_and_reason_without_a_traceback(mesh, workdir, catalogue):
    def failed(*args: str, token: bool = True) -> str:
        result = cli(mesh, workdir, *args, token=token)
        assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr + result.stdout
        return result.stderr

    no_token = failed("roster", "cli101", token=False)
    assert "error: UNAUTHENTICATED" in no_token and "reason: ADMIN_TOKEN_REQUIRED" in no_token, no_token
    assert "hint:" in no_token

    bad_email = failed("register", "--course", "cli101", "--name", "Eve", "--email", "not-an-address",
                       "--birth-date", "1990-01-01")
    assert "error: INVALID_ARGUMENT" in bad_email and "reason: " in bad_email, bad_email
    assert re.search(r"^\s+field email: ", bad_email, re.M), bad_email

    forged = failed("watch", "no-such-registration", "--for", "5")
    assert "error: INVALID_ARGUMENT" in forged and "reason: FIELD_INVALID (fields=registration_id)" in forged, forged
    assert "field registration_id: is not a registration id returned by Register" in forged

    # A load stops at its first failed call and tells what it had done.
    (workdir / "orphan.yaml").write_text(
        "courses:\n  - {course_id: cli302, campus_id: nowhere, name: Nowhere Course, capacity: 4}\n")
    orphan = cli(mesh, workdir, "catalogue", "load", "orphan.yaml")
    assert orphan.returncode == 1 and "Traceback" not in orphan.stderr, orphan.stderr
    assert "error: NOT_FOUND" in orphan.stderr and "reason: CAMPUS_NOT_FOUND (campus_id=nowhere)" in orphan.stderr
    assert load_counts(orphan.stdout)["courses"] == (0, 0, 0)


def test_a_mistake_in_the_command_exits_2_with_a_message(mesh, workdir):
    missing = cli(mesh, workdir, "catalogue", "load", "missing.yaml")
    assert missing.returncode == 2 and "cannot read missing.yaml" in missing.stderr, missing.stderr
    bad_date = cli(mesh, workdir, "register", "--course", "cli101", "--name", "Eve", "--email", "eve@example.com",
                   "--birth-date", "01/02/1990")
    assert bad_date.returncode == 2 and "YYYY-MM-DD" in bad_date.stderr, bad_date.stderr
    assert "Traceback" not in missing.stderr + bad_date.stderr
