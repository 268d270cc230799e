"""Entry point of the `coursesignup` console script (and of `python -m coursesignup_cli`)."""

from __future__ import annotations

from coursesignup_cli.app import run


def main() -> None:
    run()


if __name__ == "__main__":
    main()
