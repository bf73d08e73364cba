"""The pure core of idempay: no I/O, no drivers, no frameworks, only the standard library.

Everything here is deterministic and side-effect free, so it is tested exhaustively and
shared by the sync and async engines.
"""
