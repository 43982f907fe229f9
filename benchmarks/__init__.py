"""Benchmark scripts (`make bench-*`): measured side by side in one run, never timed tests."""
