"""harpoon's benchmarks: one command measures every figure next to its baselines.

`python -m bench` (or `python bench/run.py`) starts a throw-away containerd, runs each
benchmark N times interleaved with its baselines (boot floor, runc), prints a markdown
table on stdout and writes it with the raw samples to `bench/results/`. See README.md.

Benchmarks only report: a slow or failed run is a sample that says so, never an error.
Nothing here is imported by harpoon itself.
"""
