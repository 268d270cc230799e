"""The stats service's storage: SQLAlchemy Core tables of the read model."""
