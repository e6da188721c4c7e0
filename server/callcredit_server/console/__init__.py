"""callcredit-console: a web console for operators, a client of the server.

Pages of accounts and of one account (balance, a live burn-down chart, open calls,
recent calls, the ledger), live through the server's changefeed, and the actions top-up,
adjust, suspend and resume, each confirmed and CSRF-protected. The decisions are plain
functions in ``burndown`` (the chart), ``forms`` (what a form asks for) and
``security`` (passwords, sessions, CSRF); ``app`` is the Starlette shell around them,
``feed`` the changefeed follower, ``cli`` the command.
"""
