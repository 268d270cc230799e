"""Alembic environment of the notifier database: the models the migrations must agree with."""

from libs import consumer
from libs.migrations import run_env
from services.notifier.adapters.repository import metadata

run_env([metadata, consumer.metadata])
