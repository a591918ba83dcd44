"""``python -m talos`` runs the command line."""

from talos.cli.main import main

main()
