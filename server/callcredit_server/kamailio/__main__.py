"""`python -m callcredit_server.kamailio`: the callcredit-kamailio adapter."""

from callcredit_server.kamailio.cli import main

raise SystemExit(main())
