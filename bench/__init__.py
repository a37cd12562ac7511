"""fastflow benchmarks: pytest-benchmark suites, the one-shot GPU suite, result tracking (see README.md)."""
