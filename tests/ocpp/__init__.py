"""Tests of the OCPP layer: central system, frame checker, dispatcher, simulator."""
