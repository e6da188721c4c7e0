"""The systems bench_compare.py drives, each behind the same closed-loop workload."""
