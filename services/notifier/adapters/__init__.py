"""The notifier's I/O: its SQLAlchemy tables, the SMTP connection pool, the jinja2 templates."""
