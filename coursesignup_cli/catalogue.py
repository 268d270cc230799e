"""Loading a catalogue file (CSV or YAML) into the enrollment service, idempotently.

The file says what the catalogue should hold; the load compares it with what the service
answers and creates what is missing, updates a course whose name or capacity differ, and
leaves the rest alone, so loading the same file twice changes nothing the second time.

CSV: one row per course, with its campus (a row with only the campus columns declares a
campus without courses)::

    campus_id,campus_name,course_id,course_name,capacity
    north,North Campus,art110,Art History,30

YAML::

    campuses:
      - {campus_id: north, name: North Campus}
    courses:
      - {course_id: art110, campus_id: north, name: Art History, capacity: 30}
"""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import yaml

from coursesignup.enrollment.v1 import enrollment_pb2
from coursesignup_cli.connection import pages

CSV_COLUMNS = ("campus_id", "campus_name", "course_id", "course_name", "capacity")


class CatalogueFileError(Exception):
    """The file cannot be read or says something the load cannot use."""


@dataclass(frozen=True)
class CampusEntry:
    campus_id: str
    name: str


@dataclass(frozen=True)
class CourseEntry:
    course_id: str
    campus_id: str
    name: str
    capacity: int


@dataclass(frozen=True)
class Catalogue:
    campuses: tuple[CampusEntry, ...]
    courses: tuple[CourseEntry, ...]

    def __len__(self) -> int:
        return len(self.campuses) + len(self.courses)


@dataclass
class Counts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass
class LoadReport:
    campuses: Counts = field(default_factory=Counts)
    courses: Counts = field(default_factory=Counts)
    # What the file wants but the API cannot change (a campus's name, a course's campus).
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any((c.created, c.updated) != (0, 0) for c in (self.campuses, self.courses))


def read_catalogue(path: pathlib.Path) -> Catalogue:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CatalogueFileError(f"cannot read {path}: {error.strerror}") from error
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _from_csv(text, path)
    if suffix in {".yaml", ".yml"}:
        return _from_yaml(text, path)
    raise CatalogueFileError(f"{path}: expected a .csv, .yaml or .yml file")


def _from_csv(text: str, path: pathlib.Path) -> Catalogue:
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise CatalogueFileError(
            f"{path}: missing CSV column(s) {', '.join(missing)}; expected {','.join(CSV_COLUMNS)}")
    campuses: dict[str, CampusEntry] = {}
    courses: list[CourseEntry] = []
    for line, row in enumerate(reader, start=2):
        where = f"{path}:{line}"
        values = {key: (row.get(key) or "").strip() for key in CSV_COLUMNS}
        if not any(values.values()):
            continue
        campus = CampusEntry(_required(values, "campus_id", where), _required(values, "campus_name", where))
        _add_campus(campuses, campus, where)
        if values["course_id"] or values["course_name"] or values["capacity"]:
            courses.append(CourseEntry(
                _required(values, "course_id", where), campus.campus_id,
                _required(values, "course_name", where), _capacity(values["capacity"], where),
            ))
    return _checked(Catalogue(tuple(campuses.values()), tuple(courses)), path)


def _from_yaml(text: str, path: pathlib.Path) -> Catalogue:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CatalogueFileError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(document, dict) or not set(document) <= {"campuses", "courses"}:
        raise CatalogueFileError(f"{path}: expected a mapping with the keys 'campuses' and 'courses'")
    campuses: dict[str, CampusEntry] = {}
    for index, item in enumerate(_items(document, "campuses", path)):
        where = f"{path}: campuses[{index}]"
        _add_campus(campuses, CampusEntry(_required(item, "campus_id", where), _required(item, "name", where)), where)
    courses = []
    for index, item in enumerate(_items(document, "courses", path)):
        where = f"{path}: courses[{index}]"
        courses.append(CourseEntry(
            _required(item, "course_id", where), _required(item, "campus_id", where),
            _required(item, "name", where), _capacity(item.get("capacity"), where),
        ))
    return _checked(Catalogue(tuple(campuses.values()), tuple(courses)), path)


def _items(document: dict[str, Any], key: str, path: pathlib.Path) -> list[dict[str, Any]]:
    items = document.get(key) or []
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise CatalogueFileError(f"{path}: '{key}' must be a list of mappings")
    return items


def _required(values: dict[str, Any], key: str, where: str) -> str:
    value = values.get(key)
    if value is None or not str(value).strip():
        raise CatalogueFileError(f"{where}: {key} is required")
    return str(value).strip()


def _capacity(value: Any, where: str) -> int:
    try:
        capacity = int(str(value).strip())
    except ValueError:
        raise CatalogueFileError(f"{where}: capacity must be a whole number, got {value!r}") from None
    if capacity < 0:
        raise CatalogueFileError(f"{where}: capacity must not be negative")
    return capacity


def _add_campus(campuses: dict[str, CampusEntry], campus: CampusEntry, where: str) -> None:
    known = campuses.setdefault(campus.campus_id, campus)
    if known.name != campus.name:
        raise CatalogueFileError(f"{where}: campus {campus.campus_id} named both {known.name!r} and {campus.name!r}")


def _checked(catalogue: Catalogue, path: pathlib.Path) -> Catalogue:
    seen: set[str] = set()
    for course in catalogue.courses:
        if course.course_id in seen:
            raise CatalogueFileError(f"{path}: course {course.course_id} appears twice")
        seen.add(course.course_id)
    return catalogue


def load_catalogue(
    enrollment: Any,
    catalogue: Catalogue,
    admin: tuple[tuple[str, str], ...],
    timeout: float,
    report: LoadReport,
    advance: Callable[[str], None] = lambda _: None,
    dry_run: bool = False,
) -> LoadReport:
    """Makes the service's catalogue hold what `catalogue` says, counting into `report`;
    `advance` is called once per entry done (for a progress bar). Stops at the first failed
    call (re-raised, `report` then tells what was done): a second run continues where it
    stopped, since what was done is then unchanged. `dry_run` counts without writing."""
    campuses = {c.campus_id: c for c in pages(
        enrollment.ListCampuses, enrollment_pb2.ListCampusesRequest(page_size=1000), "campuses", timeout=timeout)}
    courses = {c.course_id: c for c in pages(
        enrollment.ListCourses, enrollment_pb2.ListCoursesRequest(page_size=1000), "courses", timeout=timeout)}

    for campus in catalogue.campuses:
        existing = campuses.get(campus.campus_id)
        if existing is None:
            try:
                if not dry_run:
                    enrollment.CreateCampus(enrollment_pb2.CreateCampusRequest(
                        campus=enrollment_pb2.Campus(campus_id=campus.campus_id, name=campus.name)),
                        metadata=admin, timeout=timeout)
                report.campuses.created += 1
            except grpc.RpcError as error:  # created meanwhile by someone else: compare with theirs
                if not (isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.ALREADY_EXISTS):
                    raise
                existing = enrollment.GetCampus(
                    enrollment_pb2.GetCampusRequest(campus_id=campus.campus_id), timeout=timeout)
        if existing is not None:
            report.campuses.unchanged += 1
            if existing.name != campus.name:
                report.warnings.append(
                    f"campus {campus.campus_id} is named {existing.name!r}, the file says {campus.name!r}: "
                    "the API cannot rename a campus, left as is")
        advance(f"campus {campus.campus_id}")

    for course in catalogue.courses:
        existing = courses.get(course.course_id)
        if existing is None:
            try:
                if not dry_run:
                    enrollment.CreateCourse(enrollment_pb2.CreateCourseRequest(course=enrollment_pb2.Course(
                        course_id=course.course_id, campus_id=course.campus_id, name=course.name,
                        capacity=course.capacity)), metadata=admin, timeout=timeout)
                report.courses.created += 1
            except grpc.RpcError as error:
                if not (isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.ALREADY_EXISTS):
                    raise
                existing = enrollment.GetCourse(
                    enrollment_pb2.GetCourseRequest(course_id=course.course_id), timeout=timeout)
        if existing is not None:
            _update_course(enrollment, existing, course, admin, timeout, report, dry_run)
        advance(f"course {course.course_id}")
    return report


def _update_course(
    enrollment: Any, existing: Any, course: CourseEntry, admin: tuple[tuple[str, str], ...], timeout: float,
    report: LoadReport, dry_run: bool,
) -> None:
    if existing.campus_id != course.campus_id:
        report.warnings.append(
            f"course {course.course_id} is on campus {existing.campus_id}, the file says {course.campus_id}: "
            "the API cannot move a course, left there")
    mask = [name for name, differs in (("name", existing.name != course.name),
                                       ("capacity", existing.capacity != course.capacity)) if differs]
    if not mask:
        report.courses.unchanged += 1
        return
    if not dry_run:
        enrollment.UpdateCourse(enrollment_pb2.UpdateCourseRequest(
            course=enrollment_pb2.Course(course_id=course.course_id, name=course.name, capacity=course.capacity),
            update_mask=mask), metadata=admin, timeout=timeout)
    report.courses.updated += 1
