"""Fault handling with real faults: the journal's database really fails under a running server.

PostgreSQL is reached through a TCP proxy the test controls (proxy.py): it cuts the link,
loses the reply to a COMMIT that PostgreSQL did make durable, or stalls. SQLite lives on
a small file system the test mounts (filesystems.py): a tmpfs filled up (SQLITE_FULL) or
an ext4 image that the kernel turns read-only after a file-system error. Every test shows
the server fail-stop (UNAVAILABLE, health NOT_SERVING, nothing acknowledged lost) and a
restart resume exactly (scenario.py).
"""
