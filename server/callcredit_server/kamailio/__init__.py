"""The callcredit-kamailio adapter: Kamailio enforces callcredit's grants on live calls.

`decisions` holds every decision (sans-I/O); `adapter` is the asyncio shell around it;
`cli` the console entry point. See docs/telephony.md.
"""

from callcredit_server.kamailio.adapter import Adapter, RpcClient, RpcError

__all__ = ["Adapter", "RpcClient", "RpcError"]
