"""Rules for functions that third-party model zoos hide from torch.fx (registered only when installed)."""
