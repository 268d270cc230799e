"""Decisions keep the student's name, and are indexed by email, for ListDecisions (issue 11);
'' in older rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 14:28:59.460164
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('decisions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=200), server_default='', nullable=False))
        batch_op.create_index('ix_decisions_email', ['email'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('decisions', schema=None) as batch_op:
        batch_op.drop_index('ix_decisions_email')
        batch_op.drop_column('name')

