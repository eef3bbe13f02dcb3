"""The `smda` command. Subcommands import what they need when they run: `smda --help` loads no torch."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
