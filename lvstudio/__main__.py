"""`python -m lvstudio` runs the CLI."""

from lvstudio.cli import main

if __name__ == "__main__":
    main()
