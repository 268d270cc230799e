"""Enrollment under faults: real processes on PostgreSQL and kinesalite, really killed and paused.

Each test checks the invariants of DESIGN.md against the databases afterwards: no
course over capacity at any sampled moment, exactly one decision per accepted
registration, statistics equal to a recount, one email of each kind per registration.
The chaos test mixes waiting lists and cancellations in and compares every course with a
sequential replay of the registrations stream (tests.faults.LifecycleModel).
CHAOS_REGISTRATIONS raises the size of the chaos run (`make chaos`).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from coursesignup.stats.v1 import stats_pb2, stats_pb2_grpc
from libs.db import make_engine
from libs.kinesis import OutgoingRecord, kinesis_client, put_records
from tests import faults, helpers
from tests.faults import Applicant, Monitor, rows, scalar
from tests.helpers import wait_until as wait_for
from tests.mesh import running_mesh, smtp_server

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def progress_printer(total: int, label: str) -> Any:
    step = max(1, total // 10)

    def report(done: int) -> None:
        if done % step == 0 or done == total:
            print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)

    return report


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_of(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def check_decisions(engine: Any, applicants: list[Applicant], accepted: dict[int, str],
                    capacities: dict[str, int], unknown_course: set[str] | None = None) -> None:
    """`unknown_course`: registrations also accepted, for courses that do not exist."""
    registration_ids = set(accepted.values())
    decided = {r[0]: r[1] for r in rows(engine, "SELECT registration_id, outcome FROM decisions")}
    strays = unknown_course or set()
    assert set(decided) == registration_ids | strays, "every accepted registration has exactly one decision"
    assert {decided[r] for r in strays} <= {"DECLINED_UNKNOWN_COURSE"}
    for stray in strays:
        del decided[stray]
    seats = {r[0]: (r[1], r[2], r[3]) for r in rows(
        engine,
        "SELECT c.course_id, c.capacity, c.enrolled_count, count(e.email) FROM courses c "
        "LEFT JOIN enrollments e ON e.course_id = c.course_id GROUP BY c.course_id, c.capacity, c.enrolled_count")}
    expected = faults.expected_seats(applicants, accepted, capacities)
    for course_id, want in expected.items():
        capacity, counter, enrolled = seats[course_id]
        assert counter == enrolled == want, (course_id, capacity, counter, enrolled, want)
    outcomes = Counter(decided.values())
    assert outcomes["ENROLLED"] == sum(expected.values())
    assert outcomes["ENROLLED"] + outcomes["DECLINED_FULL"] + outcomes["DECLINED_DUPLICATE"] == len(registration_ids)


def check_stats(stats_target: str, engine: Any, course_ids: list[str]) -> None:
    """The stats service's figures equal a recount from the enrollment rows."""
    today = dt.datetime.now(dt.UTC).date()
    roster = rows(engine, "SELECT course_id, email, birth_date FROM enrollments")
    with grpc.insecure_channel(stats_target) as channel:
        stub = stats_pb2_grpc.StatsServiceStub(channel)
        for course_id in course_ids:
            ages = [faults.age_on(b, today) for c, _, b in roster if c == course_id]
            got = stub.GetCourseStats(stats_pb2.GetCourseStatsRequest(course_id=course_id), timeout=10)
            assert got.student_count == len(ages), course_id
            if ages:
                assert (got.min_age, got.max_age) == (min(ages), max(ages)), course_id
                assert got.average_age == pytest.approx(sum(ages) / len(ages)), course_id
        students = {email: birth for _, email, birth in roster}
        overall = stub.GetOverallStats(stats_pb2.GetOverallStatsRequest(), timeout=10)
        ages = [faults.age_on(b, today) for b in students.values()]
        assert overall.student_count == len(students)
        assert (overall.min_age, overall.max_age) == (min(ages), max(ages))
        assert overall.average_age == pytest.approx(sum(ages) / len(ages))


def sign_up_markers(registration_target: str, course_ids: list[str]) -> tuple[list[Applicant], dict[int, str]]:
    """One marker sign-up per course, under a fresh email. Registration puts the command and
    enrollment its decision event under the course as partition key, so each marker travels
    the shards of its course's earlier sign-ups on both streams, behind them."""
    markers = [Applicant(f"Marker {course_id}", f"marker-{course_id}-{uuid.uuid4().hex[:6]}@example.com",
                         dt.date(1990, 1, 1), course_id, request_id=str(uuid.uuid4()))
               for course_id in course_ids]
    result = faults.register_all(registration_target, markers)
    assert not result.failures and len(result.accepted) == len(markers), result.failures
    return markers, result.accepted


def notifier_drained(notifier_target: str) -> bool:
    """Nothing pending and no send in progress at the notifier."""
    with grpc.insecure_channel(notifier_target) as channel:
        stats = notifier_pb2_grpc.NotifierServiceStub(channel).GetDeliveryStats(
            notifier_pb2.GetDeliveryStatsRequest(), timeout=10)
    return stats.pending_count == 0 and stats.in_flight == 0


def lifecycle_state(engine: Any) -> dict[str, Any]:
    """What enrollment's tables say about every registration: decisions (outcome, promoted),
    seats, each course's waiting line in order, and the seat counters."""
    waiting: dict[str, list[str]] = {}
    for course_id, registration_id in rows(engine, "SELECT course_id, registration_id FROM waitlist "
                                                   "ORDER BY course_id, seq"):
        waiting.setdefault(course_id, []).append(registration_id)
    return {
        "decisions": {r[0]: (r[1], bool(r[2])) for r in rows(
            engine, "SELECT registration_id, outcome, promoted FROM decisions")},
        "enrollments": {r[0]: (r[1], r[2]) for r in rows(
            engine, "SELECT registration_id, course_id, email FROM enrollments")},
        "waiting": waiting,
        "counters": {r[0]: r[1] for r in rows(engine, "SELECT course_id, enrolled_count FROM courses")},
    }


def without(state: dict[str, Any], registration_ids: set[str]) -> dict[str, Any]:
    """`state` as if `registration_ids` (markers that took no place in line) had never come."""
    taken = Counter(course for rid, (course, _) in state["enrollments"].items() if rid in registration_ids)
    assert not any(rid in registration_ids for line in state["waiting"].values() for rid in line)
    return {
        "decisions": {k: v for k, v in state["decisions"].items() if k not in registration_ids},
        "enrollments": {k: v for k, v in state["enrollments"].items() if k not in registration_ids},
        "waiting": state["waiting"],
        "counters": {course: count - taken[course] for course, count in state["counters"].items()},
    }


def check_against_model(engine: Any, model: faults.LifecycleModel, registration_target: str,
                        enrollment_target: str, rng: random.Random) -> None:
    """Enrollment's tables, GetCourse, ListRegistrations and GetRegistration all tell the
    outcome of the sequential replay, course by course."""
    state = lifecycle_state(engine)
    assert {rid: outcome for rid, (outcome, _) in state["decisions"].items()} == model.status
    assert {rid for rid, (_, promoted) in state["decisions"].items() if promoted} == model.promoted
    expected_seats = {rid: (model.course_of[rid], model.student_of[rid])
                      for rid, status in model.status.items() if status == "ENROLLED"}
    assert state["enrollments"] == expected_seats
    assert state["waiting"] == {c: course.waiting for c, course in model.courses.items() if course.waiting}
    assert state["counters"] == {c: len(course.enrolled) for c, course in model.courses.items()}
    with grpc.insecure_channel(enrollment_target) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        for course_id, course in model.courses.items():
            got = stub.GetCourse(enrollment_pb2.GetCourseRequest(course_id=course_id), timeout=10)
            assert (got.enrolled_count, got.waitlist_count) == (len(course.enrolled), len(course.waiting)), course_id
            assert got.enrolled_count <= got.capacity == course.capacity
    status_name = registration_pb2.RegistrationStatus.Name
    expected = {rid: (f"REGISTRATION_STATUS_{status}", model.position(rid)) for rid, status in model.status.items()}
    listed: dict[str, tuple[str, int]] = {}
    with grpc.insecure_channel(registration_target) as channel:
        stub = registration_pb2_grpc.RegistrationServiceStub(channel)
        token = ""
        while True:
            page = stub.ListRegistrations(registration_pb2.ListRegistrationsRequest(
                page_size=1000, page_token=token), metadata=helpers.ADMIN_METADATA, timeout=30)
            for row in page.registrations:
                registration = row.registration
                assert registration.registration_id not in listed
                assert registration.course_id == model.course_of[registration.registration_id]
                listed[registration.registration_id] = (status_name(registration.status),
                                                        registration.waitlist_position)
            token = page.next_page_token
            if not token:
                break
        assert listed == expected
        waiting = [rid for rid, status in model.status.items() if status == "WAITLISTED"]
        others = sorted(set(model.status) - set(waiting))
        for rid in waiting + rng.sample(others, min(300, len(others))):
            got = stub.GetRegistration(registration_pb2.GetRegistrationRequest(registration_id=rid), timeout=10)
            assert (status_name(got.status), got.waitlist_position) == expected[rid], rid


def check_lifecycle_emails(smtp: Any, expected: set[tuple[str, str]]) -> None:
    """Exactly the emails the rules call for, each once."""
    with smtp.lock:
        sent = Counter((m["X-Course-Signup-Registration"], m["X-Course-Signup-Kind"]) for m in smtp.messages)
    assert all(count == 1 for count in sent.values()), [k for k, c in sent.items() if c > 1][:5]
    assert set(sent) == expected, (sorted(set(sent) - expected)[:5], sorted(expected - set(sent))[:5])


def redeliver_records(kinesis_endpoint: str, stream: str, records: list[faults.StreamedRecord]) -> int:
    """The very records again, under their partition keys (an at-least-once producer)."""
    client = kinesis_client("us-east-1", endpoint_url=kinesis_endpoint)
    assert all(put_records(client, stream, [OutgoingRecord(r.partition_key, r.data) for r in records]))
    return len(records)


CHAOS_REGISTRATIONS = int(os.environ.get("CHAOS_REGISTRATIONS", "20000"))


@pytest.mark.timeout(max(600, CHAOS_REGISTRATIONS // 20))  # `make chaos` runs 100,000
def test_chaos_workers_killed_and_database_connections_cut_nothing_overbooked_lost_or_doubled(
    tmp_path, kinesis_endpoint
):
    """20,000 sign-ups (CHAOS_REGISTRATIONS), 30% of them willing to wait, and one
    CancelRegistration per eight sign-ups mixed in through the registration service, while
    two of three enrollment workers are killed and every database connection is cut; then
    sign-ups and cancellations redelivered. Every course ends as a sequential replay of
    the registrations stream says, the stats and the emails follow it exactly."""
    total = CHAOS_REGISTRATIONS
    rng = random.Random(20261128)
    demand = total // 50
    capacities = {f"k{i:02d}": rng.randint(demand // 4, demand * 3 // 2) for i in range(50)}
    campus_of = lambda course_id: f"campus-{int(course_id[1:]) % 3}"  # noqa: E731
    applicants = faults.make_applicants(rng, sorted(capacities), total, waitlist_share=0.3)
    cancellations = max(40, total // 8)
    started = time.monotonic()

    def phase(label: str) -> None:  # where the time goes (printed, never asserted)
        print(f"chaos: {label} at {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    app_name = f"chaos{uuid.uuid4().hex[:8]}"
    env = {"KINESIS_SHARD_COUNT": "4", "LEASE_SECONDS": "3", "SMTP_MAX_CONNECTIONS": "8"}
    with faults.postgres_databases(app_name) as urls, smtp_server(headers_only=True) as (smtp_port, smtp), \
            running_mesh(tmp_path, kinesis_endpoint, smtp_port, database_urls=urls, extra_env=env,
                         services=("enrollment", "stats", "notifier")) as mesh:
        mesh.start("enrollment", "enrollment-2")
        mesh.start("enrollment", "enrollment-3")
        mesh.wait_healthy(["enrollment-2", "enrollment-3"])
        faults.create_catalogue(mesh.target("enrollment"), capacities, campus_of)
        mesh.start("registration")
        mesh.wait_healthy(["registration"])
        stream = f"{mesh.env['KINESIS_STREAM_PREFIX']}registrations"
        engine = make_engine(urls["enrollment"].replace(app_name, f"check-{app_name}"))

        faults_done: list[str] = []
        done_counter = {"n": 0}

        def inject_faults() -> None:
            plan = [(0.2, "kill enrollment-2"), (0.45, "cut database connections"), (0.7, "kill enrollment-3")]
            for share, action in plan:
                while done_counter["n"] < share * total:
                    time.sleep(0.05)
                if action.startswith("kill"):
                    name = action.split()[1]
                    mesh.stop(name, signal.SIGKILL)
                    time.sleep(1.0)
                    mesh.start("enrollment", name)
                else:
                    assert faults.terminate_backends(app_name) > 0
                faults_done.append(action)

        def progress(done: int) -> None:
            done_counter["n"] = done
            progress_printer(total, "chaos: registered")(done)

        def decided() -> int:
            return int(scalar(engine, "SELECT count(*) FROM decisions"))

        injector = threading.Thread(target=inject_faults, daemon=True)
        with Monitor(urls["enrollment"]) as monitor:
            injector.start()
            result = faults.register_all(mesh.target("registration"), applicants, progress=progress,
                                         cancellations=cancellations, rng=random.Random(rng.random()))
            injector.join(60)
            phase("load done")
            redelivered = faults.redeliver(kinesis_endpoint, stream, applicants, result.accepted, rng, 500)
            poison = faults.put_poison(kinesis_endpoint, stream, [rng.choice(sorted(capacities)) for _ in range(20)])
            registration_ids = set(result.accepted.values())
            wait_for(lambda: decided() == len(registration_ids), timeout=300, what="every registration decided")
            phase("every registration decided")
            # A marker sign-up per course follows every command of its course on its shard:
            # once the markers are decided, so is every cancellation before them.
            first_markers, first_marked = sign_up_markers(mesh.target("registration"), sorted(capacities))
            wait_for(lambda: decided() == len(registration_ids) + len(first_markers), 120, "the markers decided")
            before = lifecycle_state(engine)
            phase("the first markers decided")
            assert set(before["decisions"]) == registration_ids | set(first_marked.values()), \
                "every accepted registration has exactly one decision"

            # Redelivered cancellations (the very records), and sign-ups of registrations since
            # cancelled: nothing may change, which the second markers prove once they are decided.
            wait_for(lambda: scalar(engine, "SELECT count(*) FROM outbox") == 0, 120, "every event published")
            reader = faults.StreamReader(kinesis_endpoint, stream)
            commands = [(r, faults.decoded(r)) for r in reader.read()]
            cancels = [r for r, envelope in commands if envelope and envelope.HasField("cancel_registration")]
            cancelled = {rid for rid, (outcome, _) in before["decisions"].items() if outcome == "CANCELLED"}
            cancelled_sign_ups = [r for r, envelope in commands if envelope and envelope.HasField("register_student")
                                  and envelope.register_student.registration_id in cancelled]
            again = rng.sample(cancels, min(400, len(cancels))) + rng.sample(
                cancelled_sign_ups, min(100, len(cancelled_sign_ups)))
            assert redeliver_records(kinesis_endpoint, stream, again) == len(again)
            markers, marked = sign_up_markers(mesh.target("registration"), sorted(capacities))
            marker_ids = set(marked.values())
            wait_for(lambda: decided() == len(before["decisions"]) + len(markers), 120, "the second markers decided")
            monitor.sample()
        phase("the second markers decided")
        assert without(lifecycle_state(engine), marker_ids) == before, "a redelivered command changed something"
        assert faults_done == ["kill enrollment-2", "cut database connections", "kill enrollment-3"]
        assert not result.failures, Counter(result.failures.values())
        assert not result.cancel_failures, result.cancel_failures[:5]
        assert redelivered == 500 and monitor.samples > 10
        assert monitor.overbooked == [], monitor.overbooked[:5]
        assert monitor.miscounted == [], monitor.miscounted[:5]
        assert monitor.waiting_beside_free_seats == [], monitor.waiting_beside_free_seats[:5]
        assert monitor.checkpoint_regressions == [], monitor.checkpoint_regressions[:5]
        wait_for(lambda: scalar(engine, "SELECT count(*) FROM dead_letters") == poison, 60, "poison dead-lettered")

        model = faults.LifecycleModel(capacities)
        reader.read()  # the rest: the redeliveries and the second markers
        model.replay(reader.records)
        print(f"chaos: cancellations answered {dict(result.cancel_answers)}; replay {dict(model.counts)}",
              file=sys.stderr, flush=True)
        # The load did what it is for: cancellations answered in every state, seats freed
        # and given to the line, places left, redeliveries met with no effect.
        assert sum(result.cancel_answers.values()) == cancellations
        assert {"PENDING", "ENROLLED", "CANCELLED"} <= set(result.cancel_answers)
        for seen in ("WAITLISTED", "DECLINED_FULL", "DECLINED_DUPLICATE", "promoted", "cancel of ENROLLED",
                     "cancel of WAITLISTED", "cancel of CANCELLED: nothing", "sign-up again"):
            assert model.counts[seen] > 0, seen
        assert model.counts["undecodable"] == poison
        check_against_model(engine, model, mesh.target("registration"), mesh.target("enrollment"), rng)
        phase("compared with the replay")

        # Stats: every enrollment there ever was, the cancelled ones removed; then the
        # figures equal a recount of the enrollment rows.
        stats_engine = make_engine(urls["stats"].replace(app_name, f"check-{app_name}"))
        expected_roster = {rid: model.status[rid] != "ENROLLED" for rid in model.ever_enrolled}

        def roster() -> dict[str, bool]:
            return {r[0]: r[1] for r in rows(stats_engine, "SELECT registration_id, removed_time IS NOT NULL "
                                                           "FROM roster")}

        wait_for(lambda: roster() == expected_roster, timeout=120, what="stats caught up")
        check_stats(mesh.target("stats"), engine, sorted(capacities))
        phase("stats compared")

        def emails_sent() -> int:
            with smtp.lock:
                return len(smtp.messages)

        wait_for(lambda: emails_sent() >= len(model.emails), timeout=400, what="every email", interval=2)
        # A duplicate email would come from a command or an event delivered twice. Every event
        # is on its stream once the outbox is empty (a relay killed after publishing publishes
        # its rows again when their claim lapses), which it was before the second markers:
        # they follow the same partition keys on both streams. Once the notifier sent both of
        # each second marker's emails it has recorded whatever came before them, and once
        # nothing is pending or being sent, any duplicate among those would have reached the server.

        def marker_emails() -> int:
            with smtp.lock:
                return sum(1 for m in smtp.messages if m["X-Course-Signup-Registration"] in marker_ids)

        wait_for(lambda: marker_emails() == 2 * len(marker_ids), 120, "both emails of every marker")
        wait_for(lambda: notifier_drained(mesh.target("notifier")), 60, "the notifier to have nothing pending")
        check_lifecycle_emails(smtp, model.emails)
        phase("emails compared")
        engine.dispose()
        stats_engine.dispose()


def test_register_keeps_accepting_while_enrollment_and_its_database_are_down(tmp_path, kinesis_endpoint):
    rng = random.Random(7)
    capacities = {f"b{i}": rng.randint(20, 80) for i in range(8)}
    app_name = f"burst{uuid.uuid4().hex[:8]}"
    with faults.postgres_databases(app_name) as urls, smtp_server(headers_only=True) as (smtp_port, _smtp):
        proxy = helpers.TcpProxy("127.0.0.1", 5432)
        proxy.start()
        direct = urls["enrollment"]
        via_proxy = direct.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
        assert via_proxy != direct
        urls = {**urls, "enrollment": via_proxy}
        try:
            with running_mesh(tmp_path, kinesis_endpoint, smtp_port, database_urls=urls,
                              extra_env={"LEASE_SECONDS": "3"}, services=("enrollment", "registration")) as mesh:
                faults.create_catalogue(mesh.target("enrollment"), capacities, lambda c: "burst")
                warm = faults.make_applicants(rng, sorted(capacities), 50)
                first = faults.register_all(mesh.target("registration"), warm)
                engine = make_engine(direct)
                wait_for(lambda: scalar(engine, "SELECT count(*) FROM decisions") == len(set(first.accepted.values())),
                         60, "the warm-up decided")

                proxy.stop()  # the database goes away under a running enrollment service ...
                mesh.stop("enrollment", signal.SIGKILL)  # ... and the service itself dies
                # A registration instance started during the outage knows no course yet:
                # it still accepts, and enrollment decides when it is back.
                mesh.stop("registration")
                mesh.start("registration")
                mesh.wait_healthy(["registration"])
                # Health tells the degradation apart: serving, but without its catalogue.
                assert health_of(mesh.target("registration")) == SERVING
                wait_for(lambda: health_of(mesh.target("registration"), "dependency:enrollment") == NOT_SERVING,
                         30, "registration to report enrollment unreachable")
                burst = faults.make_applicants(rng, sorted(capacities), 600)
                during = faults.register_all(mesh.target("registration"), burst)
                assert not during.failures, Counter(during.failures.values())
                assert len(during.accepted) == len(burst)
                stray = faults.make_applicants(rng, ["nosuchcourse"], 1)
                unverified = faults.register_all(mesh.target("registration"), stray)
                assert not unverified.failures, unverified.failures
                stray_id = unverified.accepted[0]
                with grpc.insecure_channel(mesh.target("registration")) as channel:
                    stub = registration_pb2_grpc.RegistrationServiceStub(channel)
                    some = rng.sample(sorted(set(during.accepted.values())), 10) + [stray_id]
                    statuses = {stub.GetRegistration(registration_pb2.GetRegistrationRequest(registration_id=r)).status
                                for r in some}
                assert statuses == {registration_pb2.REGISTRATION_STATUS_PENDING}

                mesh.start("enrollment")  # back, but the database is still down: not ready yet
                time.sleep(2)
                proxy.start()  # the database returns
                mesh.wait_healthy(["enrollment"])
                wait_for(lambda: health_of(mesh.target("registration"), "dependency:enrollment") == SERVING,
                         60, "registration to report enrollment reachable again")
                accepted = {**first.accepted, **{len(warm) + i: r for i, r in during.accepted.items()}}
                everyone = warm + burst
                wait_for(lambda: scalar(engine, "SELECT count(*) FROM decisions") == len(set(accepted.values())) + 1,
                         120, "the backlog decided")
                with grpc.insecure_channel(mesh.target("registration")) as channel:
                    stub = registration_pb2_grpc.RegistrationServiceStub(channel)
                    # PENDING until registration's channel to enrollment has reconnected.
                    wait_for(lambda: stub.GetRegistration(registration_pb2.GetRegistrationRequest(
                        registration_id=stray_id)).status != registration_pb2.REGISTRATION_STATUS_PENDING,
                        60, "the stray sign-up's decision visible")
                    stray_status = stub.GetRegistration(registration_pb2.GetRegistrationRequest(
                        registration_id=stray_id)).status
                assert stray_status == registration_pb2.REGISTRATION_STATUS_DECLINED_UNKNOWN_COURSE
                check_decisions(engine, everyone, accepted, capacities, unknown_course={stray_id})
                engine.dispose()
        finally:
            proxy.close()


def test_a_resharded_stream_keeps_each_course_in_order_and_loses_nothing(tmp_path, kinesis_endpoint):
    """Parents are finished before children: per course, the seats go to the first
    `capacity` distinct applicants in stream order, across two generations of splits."""
    rng = random.Random(11)
    capacities = {f"r{i}": rng.randint(5, 25) for i in range(12)}
    app_name = f"reshard{uuid.uuid4().hex[:8]}"
    with faults.postgres_databases(app_name) as urls, smtp_server(headers_only=True) as (smtp_port, _smtp):
        env = {"KINESIS_SHARD_COUNT": "2", "LEASE_SECONDS": "3"}
        with running_mesh(tmp_path, kinesis_endpoint, smtp_port, database_urls=urls, extra_env=env,
                          services=("enrollment",)) as mesh:
            faults.create_catalogue(mesh.target("enrollment"), capacities, lambda c: "reshard")
            mesh.stop("enrollment")  # consumers stopped: the splits happen with records waiting
            stream = f"{mesh.env['KINESIS_STREAM_PREFIX']}registrations"
            client = kinesis_client("us-east-1", endpoint_url=kinesis_endpoint)
            order: list[Applicant] = []
            ids: dict[int, str] = {}

            def put_generation(count: int) -> None:
                batch = faults.make_applicants(rng, sorted(capacities), count, retry_share=0)
                for applicant in batch:
                    ids[len(order)] = f"reg_{uuid.uuid4().hex}"
                    order.append(applicant)
                records = []
                for index in range(len(order) - count, len(order)):
                    applicant = order[index]
                    records.append(OutgoingRecord(applicant.course_id, faults.command_bytes(applicant, ids[index])))
                assert all(put_records(client, stream, records))

            def split_all_open() -> None:
                for shard in client.list_shards(StreamName=stream)["Shards"]:
                    if "EndingSequenceNumber" in shard["SequenceNumberRange"]:
                        continue
                    low = int(shard["HashKeyRange"]["StartingHashKey"])
                    high = int(shard["HashKeyRange"]["EndingHashKey"])
                    client.split_shard(StreamName=stream, ShardToSplit=shard["ShardId"],
                                       NewStartingHashKey=str((low + high) // 2))
                    wait_for(lambda: client.describe_stream_summary(StreamName=stream)
                             ["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE", 30, "split", 0.1)

            put_generation(150)
            split_all_open()
            put_generation(150)
            mesh.start("enrollment")
            mesh.start("enrollment", "enrollment-2")
            mesh.wait_healthy(["enrollment", "enrollment-2"])
            time.sleep(0.5)
            split_all_open()  # a live split, while the workers consume
            put_generation(150)

            engine = make_engine(urls["enrollment"])
            wait_for(lambda: scalar(engine, "SELECT count(*) FROM decisions") == len(order), 120, "all decided")
            enrolled = {(r[0], r[1]) for r in rows(engine, "SELECT course_id, email FROM enrollments")}
            expected: set[tuple[str, str]] = set()
            for course_id, capacity in capacities.items():
                firsts: list[str] = []
                for applicant in order:
                    email = applicant.email.lower()
                    if applicant.course_id == course_id and email not in firsts and len(firsts) < capacity:
                        firsts.append(email)
                expected |= {(course_id, email) for email in firsts}
            assert enrolled == expected
            shards = rows(engine, "SELECT shard_id, finished FROM shard_leases")
            assert len(shards) == 2 + 4 + 8 and sum(1 for _, finished in shards if finished) == 6
            engine.dispose()


def test_a_worker_paused_past_its_lease_cannot_commit_after_another_took_its_shards(tmp_path, kinesis_endpoint):
    rng = random.Random(5)
    capacities = {f"f{i}": rng.randint(50, 150) for i in range(16)}
    app_name = f"fence{uuid.uuid4().hex[:8]}"
    lease_seconds = 2.0
    with faults.postgres_databases(app_name) as urls, smtp_server(headers_only=True) as (smtp_port, _smtp):
        env = {"KINESIS_SHARD_COUNT": "4", "LEASE_SECONDS": str(lease_seconds)}
        with running_mesh(tmp_path, kinesis_endpoint, smtp_port, database_urls=urls, extra_env=env,
                          services=("enrollment", "registration")) as mesh:
            faults.create_catalogue(mesh.target("enrollment"), capacities, lambda c: "fence")
            mesh.start("enrollment", "paused")
            mesh.wait_healthy(["paused"])
            engine = make_engine(urls["enrollment"])
            wait_for(lambda: scalar(engine, "SELECT count(DISTINCT owner) FROM shard_leases "
                                            "WHERE owner IS NOT NULL") == 2, 30, "both workers holding shards")
            applicants = faults.make_applicants(rng, sorted(capacities), 3000)
            paused = mesh.processes["paused"]
            stopped_at: dict[str, float] = {}

            def pause_in_the_middle(done: int) -> None:
                if done == 1000 and "at" not in stopped_at:
                    paused.send_signal(signal.SIGSTOP)
                    stopped_at["at"] = time.time()

            with Monitor(urls["enrollment"], interval=0.1) as monitor:
                result = faults.register_all(mesh.target("registration"), applicants, progress=pause_in_the_middle)
                assert "at" in stopped_at
                # Past the lease (and the idle-in-transaction limit), the other worker owns every shard.
                wait_for(lambda: scalar(engine, "SELECT count(*) FROM shard_leases WHERE owner = 'paused'") == 0,
                         30, "the shards taken over", 0.1)
                time.sleep(lease_seconds)
                paused.send_signal(signal.SIGCONT)
                resumed_at = time.time()
                registration_ids = set(result.accepted.values())
                wait_for(lambda: scalar(engine, "SELECT count(*) FROM decisions") == len(registration_ids),
                         120, "every registration decided")
                # The resumed worker gets its chance to try: it has run again once it logs losing
                # its leases (its lease thread wakes with the readers holding its stale batches).
                # Then a marker sign-up per course follows every shard's records: once all are
                # decided, every shard was read and committed past the batches it had in hand.
                wait_for(lambda: "lease lost" in mesh.log_tail("paused", 400), 30,
                         "the resumed worker to find its leases lost")
                markers, marked = sign_up_markers(mesh.target("registration"), sorted(capacities))
                wait_for(lambda: scalar(engine, "SELECT count(*) FROM decisions")
                         == len(registration_ids) + len(markers), 120, "every marker decided")
                monitor.sample()
            takeovers: dict[str, float] = {}
            for (shard_id, _counter), (owner, seen) in monitor.lease_history.items():
                if owner not in (None, "paused") and seen > stopped_at["at"]:
                    takeovers[shard_id] = min(seen, takeovers.get(shard_id, seen))
            assert takeovers, "the live worker took the paused worker's shards"
            # The markers came after the resume: the resumed worker may decide them under new leases.
            marker_ids = set(marked.values())
            late = rows(engine, "SELECT shard_id, decide_time, registration_id FROM decisions "
                                "WHERE worker_id = 'paused'")
            for shard_id, decide_time, registration_id in late:
                if shard_id in takeovers and registration_id not in marker_ids:
                    assert decide_time.timestamp() < takeovers[shard_id] + 0.5, (shard_id, decide_time)
            assert monitor.checkpoint_regressions == []
            assert monitor.overbooked == []
            assert resumed_at > stopped_at["at"] + lease_seconds
            check_decisions(engine, applicants + markers,
                            {**result.accepted, **{len(applicants) + i: r for i, r in marked.items()}}, capacities)
            assert "lease lost" in mesh.log_tail("paused", 400)
            engine.dispose()


def test_registration_calls_to_a_hung_enrollment_fit_in_the_callers_deadline(tmp_path, kinesis_endpoint):
    """With enrollment frozen (SIGSTOP: connections open, nothing answers), Register and
    GetRegistration still answer within a 1.5 s deadline: their calls to enrollment take a
    share of the caller's deadline (a fixed 2 s look-up would make the caller's deadline
    pass first, DEADLINE_EXCEEDED)."""
    with smtp_server(headers_only=True) as (smtp_port, _smtp), \
            running_mesh(tmp_path, kinesis_endpoint, smtp_port, services=("enrollment", "registration"),
                         extra_env={"SEED_DEMO_CATALOGUE": "true"}) as mesh, \
            grpc.insecure_channel(mesh.target("registration")) as channel:
        stub = registration_pb2_grpc.RegistrationServiceStub(channel)
        request = registration_pb2.RegisterRequest(name="Ada Lovelace", email="ada@example.com",
                                                   course_id="notyetknown", request_id="deadline-1")
        request.birth_date.year, request.birth_date.month, request.birth_date.day = 2000, 1, 2
        with pytest.raises(grpc.RpcError) as raised:
            stub.Register(request, timeout=10)  # enrollment up: an unknown course is refused at the door
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        enrollment = mesh.processes["enrollment"]
        enrollment.send_signal(signal.SIGSTOP)
        try:
            reply = stub.Register(request, timeout=1.5)  # accepted unverified: enrollment will decide
            assert reply.status == registration_pb2.REGISTRATION_STATUS_PENDING
            got = stub.GetRegistration(registration_pb2.GetRegistrationRequest(
                registration_id=reply.registration_id), timeout=1.5)
            assert got.status == registration_pb2.REGISTRATION_STATUS_PENDING
        finally:
            enrollment.send_signal(signal.SIGCONT)
        wait_for(lambda: stub.GetRegistration(registration_pb2.GetRegistrationRequest(
            registration_id=reply.registration_id), timeout=5).status
            == registration_pb2.REGISTRATION_STATUS_DECLINED_UNKNOWN_COURSE, 60, "the unverified sign-up declined")
