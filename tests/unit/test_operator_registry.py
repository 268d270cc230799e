"""The operator command finds the services through the entry points they register."""

from __future__ import annotations

import subprocess
import sys

import pytest

from libs.kinesis import ENROLLMENT_EVENTS_STREAM, REGISTRATIONS_STREAM
from libs.migrations import Migrations
from libs.service_registry import ServiceDescription, registered_services
from services.enrollment.settings import EnrollmentSettings
from services.notifier.settings import NotifierSettings
from services.stats.settings import StatsSettings
from tests import helpers

ROOT = helpers.ROOT


def test_every_stream_consuming_service_registers_itself() -> None:
    services = registered_services()
    assert services == {
        "enrollment": ServiceDescription(EnrollmentSettings, "enrollment_database_url", (REGISTRATIONS_STREAM,),
                                         migrations=Migrations("enrollment", ROOT / "services/enrollment/migrations")),
        "stats": ServiceDescription(StatsSettings, "stats_database_url", (ENROLLMENT_EVENTS_STREAM,),
                                    migrations=Migrations("stats", ROOT / "services/stats/migrations")),
        "notifier": ServiceDescription(
            NotifierSettings, "notifier_database_url", (REGISTRATIONS_STREAM, ENROLLMENT_EVENTS_STREAM),
            migrations=Migrations("notifier", ROOT / "services/notifier/migrations"),
        ),
    }


def test_a_description_naming_a_missing_database_setting_is_refused() -> None:
    with pytest.raises(TypeError, match="no setting 'stats_db_url'"):
        ServiceDescription(StatsSettings, "stats_db_url", (ENROLLMENT_EVENTS_STREAM,))


def test_the_command_offers_exactly_the_registered_services() -> None:
    result = subprocess.run([sys.executable, "-m", "libs.operator", "leases", "--service", "registration"],
                            cwd=helpers.ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid choice: 'registration' (choose from 'enrollment', 'notifier', 'stats')" in result.stderr
