"""WAITLISTED emails keep the place in line they tell of (issue 11); NULL in other rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 14:14:53.936557
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('waitlist_position', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_column('waitlist_position')

