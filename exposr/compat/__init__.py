"""Every use of a dependency's private internals, one module per dependency.

Each module names the version it was checked against and exposes small
functions (or names bound once at import, where the caller is a hot path) so
that an upgrade is checked in one place; tests/test_compat.py fails when a
fast path they serve is no longer taken. (The SSH transport's uses of Conch
internals are kept apart, with the SSH transport.)
"""
