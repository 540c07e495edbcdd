"""Reference and parity code for tests and benchmarks (e.g. the PyTorch reference); never imported by jobs."""
