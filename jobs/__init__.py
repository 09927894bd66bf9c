"""Command-line entrypoints, one per user task; each works with `ray job submit`."""
