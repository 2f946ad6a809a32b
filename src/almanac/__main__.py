"""``python -m almanac`` runs the command line."""

from almanac.cli import main

main()
