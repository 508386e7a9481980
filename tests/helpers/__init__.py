"""Helpers importable by subprocesses of the tests (PYTHONPATH=tests)."""
