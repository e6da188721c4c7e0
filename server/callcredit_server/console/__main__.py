"""``python -m callcredit_server.console``: the same as ``callcredit-console``."""

from callcredit_server.console.cli import main

main()
