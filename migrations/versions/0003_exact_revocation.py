"""session generations, anchor identities, challenges bound to their session

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 09:40:00
"""

import sqlalchemy as sa
from alembic import context, op

from agentkeys.crypto import omni

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE (SQLite ≥ 3.35 drops columns): a batch copy of `accounts` would trip
    # the foreign keys that point at it.
    op.add_column(
        "accounts",
        sa.Column("session_generation", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.add_column("accounts", sa.Column("anchor_type", sa.String(length=64), nullable=True))
    op.add_column("accounts", sa.Column("anchor_value", sa.String(length=320), nullable=True))
    op.drop_column("accounts", "sessions_valid_after")
    op.add_column("siwe_challenges", sa.Column("session_generation", sa.BigInteger()))
    op.add_column("siwe_challenges", sa.Column("session_expires_at", sa.BigInteger()))
    # Every pending challenge was started under the old rules: none may link anything now.
    op.execute("UPDATE siwe_challenges SET status = 'used' WHERE account IS NOT NULL")
    _record_anchor_identities()


def _record_anchor_identities() -> None:
    """Name each account's anchor identity: the linked identity whose omni is the anchor."""
    client_id = context.config.attributes.get("client_id", "agentkeys")
    bind = op.get_bind()
    accounts = sa.table(
        "accounts", sa.column("anchor"), sa.column("anchor_type"), sa.column("anchor_value")
    )
    rows = bind.execute(sa.text("SELECT identity_type, identity_value FROM identities")).all()
    for identity_type, identity_value in rows:
        bind.execute(
            sa.update(accounts)
            .where(accounts.c.anchor == omni(identity_type, identity_value, client_id))
            .where(accounts.c.anchor_type.is_(None))
            .values(anchor_type=identity_type, anchor_value=identity_value)
        )


def downgrade() -> None:
    op.drop_column("siwe_challenges", "session_expires_at")
    op.drop_column("siwe_challenges", "session_generation")
    op.add_column(
        "accounts",
        sa.Column("sessions_valid_after", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.drop_column("accounts", "anchor_value")
    op.drop_column("accounts", "anchor_type")
    op.drop_column("accounts", "session_generation")
