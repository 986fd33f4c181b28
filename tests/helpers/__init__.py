"""Test helpers (imported as tests.helpers.*; pytest puts the checkout on sys.path: pyproject's pythonpath)."""
