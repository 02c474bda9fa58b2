"""How important is each channel: the scoring context, the gradient collector and the criteria registry."""
