"""Benchmarks of the jaxjob trainer: ratios measured side by side in one process.

`python -m bench --quick` (CI, ~3 min on 2 cores) or `--full` runs every CPU workload,
each in a fresh process with its own virtual device count, and prints one JSON line per
measurement and a table. `bench/gpu.sh` is the prepared script for one NVIDIA H100/H200.
See BENCHMARKS.md for the method, the figures and the commands that produced them.
"""
