"""Alembic environment of the stats database: the models the migrations must agree with."""

from libs import consumer
from libs.migrations import run_env
from services.stats.adapters.tables import metadata

run_env([metadata, consumer.metadata])
