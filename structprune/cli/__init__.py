"""The ``structprune`` command line: demo, inspect, slim, bench."""
from .main import main

__all__ = ["main"]
