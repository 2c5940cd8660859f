"""MQTT link tests against real brokers: reconnection and re-subscription (RELIABILITY.md M-08)."""
