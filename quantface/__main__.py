"""``python -m quantface`` (what ``torchrun -m quantface`` runs): the command line."""

from quantface.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
