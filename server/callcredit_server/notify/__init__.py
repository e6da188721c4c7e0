"""callcredit-notify: the changefeed's events, POSTed to webhooks, signed, at least once.

- `delivery`: the decisions, without I/O (routing, payload, signature, retries);
- `store`: the durable state (cursor, outbox, dead letters) in one SQLite file;
- `config`: the TOML configuration file;
- `runner`: the asyncio shell (follow the feed, deliver the outbox);
- `cli`: the ``callcredit-notify`` command.
"""
