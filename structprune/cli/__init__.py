"""The ``structprune`` command line: demo, inspect, slim, load, export, bench."""
from .main import main

__all__ = ["main"]
