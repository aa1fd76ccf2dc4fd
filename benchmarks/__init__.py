"""Throughput benchmarks: `python -m benchmarks.train_throughput`, `benchmarks.infer_throughput`."""
