"""``python -m app`` runs the same CLI as ``lightning-cli``."""

from app.cli import main

if __name__ == "__main__":
    main()
