"""Crash safety with real processes: a server killed with SIGKILL under client processes."""
