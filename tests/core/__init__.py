"""Tests of the pure state machine (server/callcredit_server/core), table-driven."""
