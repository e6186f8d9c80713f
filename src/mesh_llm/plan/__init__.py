"""Decisions about where models run: capacity, election and split (pure functions)."""
