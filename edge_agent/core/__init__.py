"""The device's decisions: what to do with a task, whether it may train now, and the privacy step (no I/O)."""
