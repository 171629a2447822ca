"""Scripts that print measured figures as JSON (run as `python benchmarks/<name>.py`)."""
