"""Deterministic simulation (VOPR-style): seeded workload, simulated journal, crashes."""
