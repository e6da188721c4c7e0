"""callcredit server: the single-writer balance authority."""

import os

# Snapshots are written by a child the projector forks, which never touches gRPC
# (projector.py, snapshot.py). grpcio's own fork handlers, on by default, crashed such
# a child inside gRPC's poller when the process that forked it had busy gRPC threads
# (the writer did, when it took the snapshots), so no process of this package forks
# with them on. They must be off before grpc is first imported, which importing this
# package before anything else ensures; an embedding process must set it itself.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

# A compiled core built from older sources never runs (corebuild.py).
from callcredit_server.corebuild import check_core_build

check_core_build()
