"""Everything that touches a wire, a server or a person, and the composition root.

Note: `adapters` is also the name of an unrelated distribution on PyPI; inside voltpool's own
virtual environment this package is the one that is installed.
"""
