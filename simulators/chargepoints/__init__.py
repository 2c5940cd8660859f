"""Mock OCPP 1.6-J charge points that honour the charging profiles they receive."""
