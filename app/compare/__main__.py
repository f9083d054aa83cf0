"""``python -m app.compare``: see :mod:`app.compare.cli`."""

from app.compare.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
