"""The command line: one module of argparse wiring per command group; the library never sees argparse."""

from qwenlite.cli.main import main

__all__ = ["main"]
