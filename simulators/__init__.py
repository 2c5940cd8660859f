"""Simulated chargers, fleet, households and prices that drive the controller in tests and demos.

Production code never imports this package.
"""
