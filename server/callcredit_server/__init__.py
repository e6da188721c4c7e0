"""callcredit server: the single-writer balance authority."""

import os

# Snapshots are written by a forked child that never touches gRPC (snapshot.py).
# grpcio's own fork handlers, on by default, then crash that child inside gRPC's
# poller when the parent's gRPC threads are busy. They must be off before grpc is
# first imported, which importing this package before anything else ensures for
# `callcredit-server`; an embedding process must set it itself.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

# A compiled core built from older sources never runs (corebuild.py).
from callcredit_server.corebuild import check_core_build

check_core_build()
