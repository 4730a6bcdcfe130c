"""The ``torchslim`` command line: thin, it parses, calls the public verbs and prints. ``app`` holds the global
options and the entry point; each module beside it holds one group of commands."""

from torchslim.cli import basics, pipeline, techniques  # noqa: F401 - register their commands on the app
from torchslim.cli.app import app, main

__all__ = ["app", "main"]
