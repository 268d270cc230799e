"""The registration lifecycle (issue 11): a waiting list per course, decisions keep
Register's acceptance time and whether the seat came from the waiting list, enrollments
keep the address as given and the email language (for the cancellation email; '' in
older rows).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 14:09:39.257009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('waitlist',
    sa.Column('registration_id', sa.String(length=64), nullable=False),
    sa.Column('course_id', sa.String(length=63), nullable=False),
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('contact_email', sa.String(length=320), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('birth_date', sa.Date(), nullable=False),
    sa.Column('locale', sa.String(length=16), nullable=False),
    sa.Column('accept_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('wait_time', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['course_id'], ['courses.course_id'], ),
    sa.PrimaryKeyConstraint('registration_id'),
    sa.UniqueConstraint('course_id', 'email', name='waitlist_course_email'),
    sa.UniqueConstraint('course_id', 'seq', name='waitlist_course_seq')
    )
    with op.batch_alter_table('decisions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('create_time', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('promoted', sa.Boolean(), server_default=sa.false(), nullable=False))

    with op.batch_alter_table('enrollments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('contact_email', sa.String(length=320), server_default='', nullable=False))
        batch_op.add_column(sa.Column('locale', sa.String(length=16), server_default='', nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('enrollments', schema=None) as batch_op:
        batch_op.drop_column('locale')
        batch_op.drop_column('contact_email')

    with op.batch_alter_table('decisions', schema=None) as batch_op:
        batch_op.drop_column('promoted')
        batch_op.drop_column('create_time')

    op.drop_table('waitlist')
