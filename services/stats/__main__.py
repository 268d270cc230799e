"""`python -m services.stats` runs the stats service."""

from services.stats import bootstrap

if __name__ == "__main__":
    bootstrap.main()
