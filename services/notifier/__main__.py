"""`python -m services.notifier`: runs the notifier service (port 50054 by default)."""

from services.notifier import bootstrap

if __name__ == "__main__":
    bootstrap.main()
