"""voltpool's core: domain model, events, ports, planning and the service loop.

Nothing in this package opens a socket, starts a server or imports `adapters` or `simulators`;
what it needs from the outside world it asks for through the `Protocol`s in `controller.ports`.
"""
