"""Alembic migrations of the CRM store (loaded by path through gateway.crm.migrate, never imported)."""
