"""Training a run: its settings, its record on disk, its process, log, saving rules and loop."""
