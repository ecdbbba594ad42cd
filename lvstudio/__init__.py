"""lvstudio: interactive long videos from TOML storyboards."""

__version__ = "0.1.0"
