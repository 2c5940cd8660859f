"""Security helpers shared by the adapters: MQTT principals and ACLs, log redaction."""
