"""Helpers for tests and the demo: tiny local models of every family (see `tiny`)."""
