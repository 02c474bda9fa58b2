"""Granularities that keep shapes: masks from single weights to whole channels."""
