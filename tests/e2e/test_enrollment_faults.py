"""Enrollment under faults: real processes on PostgreSQL and kinesalite, really killed and paused.

Each test checks the invariants of DESIGN.md against the databases afterwards: no
course over capacity at any sampled moment, exactly one decision per accepted
registration, statistics equal to a recount, one email of each kind per registration.
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


def check_emails(smtp: Any, registration_ids: set[str]) -> None:
    with smtp.lock:
        sent = Counter((m["X-Course-Signup-Registration"], m["X-Course-Signup-Kind"]) for m in smtp.messages)
    assert {rid for rid, _ in sent} == registration_ids
    assert all(count == 1 for count in sent.values()), [k for k, c in sent.items() if c > 1][:5]
    kinds_per_registration = Counter(rid for rid, _ in sent)
    assert set(kinds_per_registration.values()) == {2}, "one received and one decision email each"
    assert sum(1 for _, kind in sent if kind == "received") == len(registration_ids)


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


def test_chaos_workers_killed_and_database_connections_cut_nothing_overbooked_lost_or_doubled(
    tmp_path, kinesis_endpoint
):
    total = int(os.environ.get("CHAOS_REGISTRATIONS", "20000"))
    rng = random.Random(20261128)
    demand = total // 50
    capacities = {f"k{i:02d}": rng.randint(demand // 4, demand * 3 // 2) for i in range(50)}
    campus_of = lambda course_id: f"campus-{int(course_id[1:]) % 3}"  # noqa: E731
    applicants = faults.make_applicants(rng, sorted(capacities), total)
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

        injector = threading.Thread(target=inject_faults, daemon=True)
        with Monitor(urls["enrollment"]) as monitor:
            injector.start()
            result = faults.register_all(mesh.target("registration"), applicants, progress=progress)
            injector.join(60)
            redelivered = faults.redeliver(kinesis_endpoint, stream, applicants, result.accepted, rng, 500)
            poison = faults.put_poison(kinesis_endpoint, stream, [rng.choice(sorted(capacities)) for _ in range(20)])
            registration_ids = set(result.accepted.values())
            wait_for(lambda: scalar(engine, "SELECT count(*) FROM decisions") == len(registration_ids),
                     timeout=300, what="every registration decided")
            monitor.sample()
        assert faults_done == ["kill enrollment-2", "cut database connections", "kill enrollment-3"]
        assert not result.failures, Counter(result.failures.values())
        assert redelivered == 500 and monitor.samples > 10
        assert monitor.overbooked == [], monitor.overbooked[:5]
        assert monitor.checkpoint_regressions == [], monitor.checkpoint_regressions[:5]
        check_decisions(engine, applicants, result.accepted, capacities)
        wait_for(lambda: scalar(engine, "SELECT count(*) FROM dead_letters") == poison, 60, "poison dead-lettered")

        stats_engine = make_engine(urls["stats"].replace(app_name, f"check-{app_name}"))
        enrolled = scalar(engine, "SELECT count(*) FROM enrollments")
        wait_for(lambda: scalar(stats_engine, "SELECT count(*) FROM roster WHERE removed_time IS NULL") == enrolled,
                 timeout=120, what="stats caught up")
        check_stats(mesh.target("stats"), engine, sorted(capacities))

        def emails_sent() -> int:
            with smtp.lock:
                return len(smtp.messages)

        wait_for(lambda: emails_sent() >= 2 * len(registration_ids), timeout=400, what="every email", interval=2)
        # A duplicate email would come from a command or an event delivered twice. Every event
        # is on its stream once the outbox is empty (a relay killed after publishing publishes
        # its rows again when their claim lapses); then a marker sign-up per course follows the
        # same partition keys on both streams. Once the notifier sent both of each marker's
        # emails it has recorded whatever came before them, and once nothing is pending or
        # being sent, any duplicate among those would have reached the server.
        wait_for(lambda: scalar(engine, "SELECT count(*) FROM outbox") == 0, 120, "every event published")
        _, marked = sign_up_markers(mesh.target("registration"), sorted(capacities))
        marker_ids = set(marked.values())

        def marker_emails() -> int:
            with smtp.lock:
                return sum(1 for m in smtp.messages if m["X-Course-Signup-Registration"] in marker_ids)

        wait_for(lambda: marker_emails() == 2 * len(marker_ids), 120, "both emails of every marker")
        wait_for(lambda: notifier_drained(mesh.target("notifier")), 60, "the notifier to have nothing pending")
        check_emails(smtp, registration_ids | marker_ids)
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
