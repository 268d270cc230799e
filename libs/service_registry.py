"""The registry through which services make themselves known to shared tools.

A stream-consuming service names a `ServiceDescription` under the
`course_signup.services` entry-point group in pyproject.toml; the operator command
(`python -m libs.operator`) lists them from the installed package's metadata, so
`libs` knows no service by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

from libs.config import CommonSettings
from libs.migrations import Migrations

ENTRY_POINT_GROUP = "course_signup.services"


@dataclass(frozen=True)
class ServiceDescription:
    """What the operator command needs to know of a stream-consuming service."""

    settings_class: type[CommonSettings]
    # The settings attribute holding the URL of the database with its leases.
    database_url_setting: str
    # Base names (before KINESIS_STREAM_PREFIX) of the streams it consumes.
    consumed_streams: tuple[str, ...]
    # Its database's migration history (`python -m libs.operator migrate`).
    migrations: Migrations | None = None

    def __post_init__(self) -> None:
        if self.database_url_setting not in self.settings_class.model_fields:
            raise TypeError(f"{self.settings_class.__name__} has no setting {self.database_url_setting!r}")


def registered_services() -> dict[str, ServiceDescription]:
    """The services installed in this environment, by entry-point name."""
    found: dict[str, ServiceDescription] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        description = entry_point.load()
        if not isinstance(description, ServiceDescription):
            raise TypeError(f"entry point {entry_point.value} is not a ServiceDescription")
        found[entry_point.name] = description
    return found
