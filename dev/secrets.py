"""The secrets a local mesh needs, made once: `make run` writes them to var/secrets.env
(mode 0600) with `python -m dev.secrets`; tests and benchmarks put random ones in their
own environment. No secret has a default in the source: a service started without one
refuses to start, naming the variable (libs.config.Secret)."""

from __future__ import annotations

import os
import secrets
import sys

# Every secret setting of every service, by its environment variable.
SECRET_VARIABLES = (
    "REGISTRATION_ID_SECRET",  # signs registration ids (registration)
    "ENROLLMENT_PAGE_TOKEN_SECRET",  # signs page tokens (enrollment)
    "STATS_PAGE_TOKEN_SECRET",  # signs page tokens (stats)
    "LOG_PSEUDONYM_KEY",  # keys the pseudonyms of personal data in logs (every service)
)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def setdefault_environ() -> None:
    """A random value for every secret this process's environment does not set yet
    (inherited by the services it starts)."""
    for name in SECRET_VARIABLES:
        os.environ.setdefault(name, new_secret())


def main() -> None:
    sys.stdout.write("# Made once by `make run` (python -m dev.secrets); keep it private.\n")
    for name in SECRET_VARIABLES:
        sys.stdout.write(f"{name}={new_secret()}\n")


if __name__ == "__main__":
    main()
