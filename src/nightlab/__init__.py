"""nightlab: autonomous overnight research on a git repository."""

__version__ = "0.1.0"
