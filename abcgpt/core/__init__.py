"""The foundations every wing stands on: user errors, number ranges, whole-file writes, checkpoints, devices."""
