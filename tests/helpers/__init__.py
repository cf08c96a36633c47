"""Helpers the tests import as ``helpers.x``: real servers, clients, configs and fakes (no fixtures; those are in conftest.py)."""
