"""Reliability tests: the event log, crashes of its server, fail-safe start-up (RELIABILITY.md)."""
