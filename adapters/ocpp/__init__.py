"""OCPP 1.6-J: the central system (`central`), its frame checker (`frames`), the lease
dispatcher (`dispatcher`) and the profiles it sends (`profiles`). See docs/ocpp.md."""
