"""Apply a plan to a model: slice tensors, refresh size attributes and configs, copy, roll back."""
