"""Shared by the test suites in tests/ and in examples/*/tests: the real services (PostgreSQL,
MariaDB, Redis, localstripe) and their per-run fixtures, from ``tests/fixtures.py``."""

pytest_plugins = ["tests.fixtures"]
