"""`python -m lvstudio` runs the CLI."""

from lvstudio.cli import main

main()
