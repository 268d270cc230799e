"""Alembic environment of the enrollment database: the models the migrations must agree with."""

from libs import consumer, outbox
from libs.migrations import run_env
from services.enrollment.adapters.tables import metadata

run_env([metadata, consumer.metadata, outbox.metadata])
