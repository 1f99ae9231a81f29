"""The foundations every wing stands on: user errors, number ranges, whole-file writes, the checkpoint file, devices and preflight checks."""
