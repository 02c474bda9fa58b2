"""Around the engine: saving and loading, before/after reports, metrics, progress bars."""
