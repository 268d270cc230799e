"""The enrollment database's migration history (Alembic): env.py names the models, versions/
holds one migration per schema change. Run at start and by `python -m libs.operator
migrate`; see libs.migrations."""

from libs.migrations import Migrations

MIGRATIONS = Migrations.beside("enrollment", __file__)
