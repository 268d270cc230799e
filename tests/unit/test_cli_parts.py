"""The people CLI's parts that need no mesh: catalogue files, the watch loop, the
reading of an error's details. The commands themselves are tested end to end
(tests/e2e/test_cli.py)."""

from __future__ import annotations

import pathlib
import time
from typing import Any

import grpc
import pytest
import typer
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from coursesignup.registration.v1 import registration_pb2
from coursesignup_cli.app import EXIT_INTERRUPTED, EXIT_WATCH_TIMEOUT, _watch
from coursesignup_cli.catalogue import CampusEntry, CatalogueFileError, CourseEntry, read_catalogue
from coursesignup_cli.errors import describe
from coursesignup_cli.watch import FINAL, StreamingWatcher, WatchTimeout

R = registration_pb2


def test_a_csv_and_a_yaml_file_describe_the_same_catalogue(tmp_path: pathlib.Path) -> None:
    csv_file = tmp_path / "c.csv"
    csv_file.write_text("campus_id,campus_name,course_id,course_name,capacity\n"
                        "north,North,art110,Art History, 30\nnorth,North,cs101,Programming,40\nsouth,South,,,\n")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("campuses:\n  - {campus_id: north, name: North}\n  - {campus_id: south, name: South}\n"
                         "courses:\n  - {course_id: art110, campus_id: north, name: Art History, capacity: 30}\n"
                         "  - {course_id: cs101, campus_id: north, name: Programming, capacity: 40}\n")
    from_csv, from_yaml = read_catalogue(csv_file), read_catalogue(yaml_file)
    assert from_csv == from_yaml
    assert from_csv.campuses == (CampusEntry("north", "North"), CampusEntry("south", "South"))
    assert from_csv.courses[0] == CourseEntry("art110", "north", "Art History", 30)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.csv", "campus_id,course_id\nnorth,art110\n", "missing CSV column(s) campus_name, course_name, capacity"),
        ("a.csv", "campus_id,campus_name,course_id,course_name,capacity\nnorth,North,art110,Art,many\n",
         "a.csv:2: capacity must be a whole number"),
        ("a.csv", "campus_id,campus_name,course_id,course_name,capacity\nnorth,North,art110,Art,1\n"
                  "north,North,art110,Art again,2\n", "course art110 appears twice"),
        ("a.csv", "campus_id,campus_name,course_id,course_name,capacity\nnorth,North,,,\nnorth,Nord,,,\n",
         "campus north named both 'North' and 'Nord'"),
        ("a.yaml", "courses:\n  - {course_id: art110, name: Art, capacity: 3}\n", "courses[0]: campus_id is required"),
        ("a.yaml", "- just a list\n", "expected a mapping"),
        ("a.yaml", "campuses: [unclosed\n", "not valid YAML"),
        ("a.json", "{}", "expected a .csv, .yaml or .yml file"),
    ],
)
def test_a_catalogue_file_mistake_is_told_with_where_it_is(
    tmp_path: pathlib.Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CatalogueFileError) as raised:
        read_catalogue(path)
    assert message in str(raised.value)


class FakeStream:
    """What a server-streaming call returns: its messages, then how it ended."""

    def __init__(self, replies: list[Any], error: BaseException | None = None) -> None:
        self.replies, self.error, self.cancelled = replies, error, False

    def __iter__(self) -> Any:
        yield from self.replies
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


class EndedCall(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class FakeRegistration:
    """WatchRegistration answered by each stream in turn (one per call)."""

    def __init__(self, streams: list[FakeStream]) -> None:
        self.streams = streams
        self.calls: list[float] = []

    def WatchRegistration(self, request: Any, timeout: float) -> Any:  # noqa: N802 - the stub's name
        self.calls.append(timeout)
        return self.streams[len(self.calls) - 1]


def registration(status: Any, position: int = 0) -> Any:
    return R.Registration(registration_id="reg-1", course_id="art110", status=status, waitlist_position=position)


def test_watch_yields_each_change_with_positions_and_ends_at_the_decision() -> None:
    stream = FakeStream([registration(R.REGISTRATION_STATUS_PENDING),
                         registration(R.REGISTRATION_STATUS_WAITLISTED, 2),
                         registration(R.REGISTRATION_STATUS_WAITLISTED, 1),
                         registration(R.REGISTRATION_STATUS_ENROLLED),
                         registration(R.REGISTRATION_STATUS_CANCELLED)])
    stub = FakeRegistration([stream])
    updates = [(r.status, r.waitlist_position)
               for r in StreamingWatcher(stub).updates("reg-1", deadline=time.monotonic() + 60)]
    assert updates == [(R.REGISTRATION_STATUS_PENDING, 0), (R.REGISTRATION_STATUS_WAITLISTED, 2),
                       (R.REGISTRATION_STATUS_WAITLISTED, 1), (R.REGISTRATION_STATUS_ENROLLED, 0)]
    assert stream.cancelled and len(stub.calls) == 1 and 0 < stub.calls[0] <= 60


def test_watch_with_follow_goes_on_past_enrolled_until_cancelled() -> None:
    stub = FakeRegistration([FakeStream([registration(R.REGISTRATION_STATUS_ENROLLED),
                                         registration(R.REGISTRATION_STATUS_CANCELLED)])])
    updates = [r.status for r in StreamingWatcher(stub, until=FINAL).updates("reg-1", time.monotonic() + 60)]
    assert updates == [R.REGISTRATION_STATUS_ENROLLED, R.REGISTRATION_STATUS_CANCELLED]


def test_watch_opens_the_stream_again_when_an_instance_goes_away_without_repeating_itself() -> None:
    waitlisted = registration(R.REGISTRATION_STATUS_WAITLISTED, 1)
    stub = FakeRegistration([FakeStream([registration(R.REGISTRATION_STATUS_PENDING), waitlisted],
                                        EndedCall(grpc.StatusCode.UNAVAILABLE)),
                             FakeStream([waitlisted, registration(R.REGISTRATION_STATUS_DECLINED_FULL)])])
    sleeps: list[float] = []
    updates = [r.status for r in StreamingWatcher(stub, sleep=sleeps.append).updates("reg-1", time.monotonic() + 60)]
    assert updates == [R.REGISTRATION_STATUS_PENDING, R.REGISTRATION_STATUS_WAITLISTED,
                       R.REGISTRATION_STATUS_DECLINED_FULL]
    assert len(stub.calls) == 2 and len(sleeps) == 1


def test_watch_gives_up_at_its_deadline() -> None:
    stub = FakeRegistration([FakeStream([registration(R.REGISTRATION_STATUS_WAITLISTED, 3)],
                                        EndedCall(grpc.StatusCode.DEADLINE_EXCEEDED))])
    updates = StreamingWatcher(stub).updates("reg-1", deadline=time.monotonic() + 5)
    assert next(updates).status == R.REGISTRATION_STATUS_WAITLISTED
    with pytest.raises(WatchTimeout, match="still REGISTRATION_STATUS_WAITLISTED"):
        next(updates)


class StoppedWatcher:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def updates(self, registration_id: str, deadline: float) -> Any:
        yield R.Registration(registration_id=registration_id, status=R.REGISTRATION_STATUS_PENDING)
        raise self.error


@pytest.mark.parametrize(("error", "code"), [(WatchTimeout("still PENDING"), EXIT_WATCH_TIMEOUT),
                                              (KeyboardInterrupt(), EXIT_INTERRUPTED)])
def test_watch_ends_with_its_own_exit_code_on_timeout_and_ctrl_c(error: BaseException, code: int) -> None:
    with pytest.raises(typer.Exit) as raised:
        _watch(StoppedWatcher(error), "reg-1", timeout=1)
    assert raised.value.exit_code == code


class FakeCallError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a failed call raises: its code, message and trailing metadata with the details."""

    def __init__(self, status: status_pb2.Status) -> None:
        self.status = status

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        return self.status.message

    def trailing_metadata(self) -> Any:
        return (("grpc-status-details-bin", self.status.SerializeToString()),)

    def initial_metadata(self) -> Any: return ()
    def is_active(self) -> bool: return False
    def time_remaining(self) -> float | None: return None
    def cancel(self) -> bool: return False
    def add_callback(self, callback: Any) -> bool: return False


def test_an_error_is_told_with_its_reason_metadata_and_bad_fields() -> None:
    bad_request = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="email", description="is not an email address")])
    info = error_details_pb2.ErrorInfo(reason="FIELD_INVALID", domain="coursesignup", metadata={"fields": "email"})
    details = []
    for message in (bad_request, info):
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="invalid argument: email", details=details)
    assert describe(FakeCallError(status)).lines() == [
        "error: INVALID_ARGUMENT: invalid argument: email",
        "reason: FIELD_INVALID (fields=email)",
        "  field email: is not an email address",
    ]
