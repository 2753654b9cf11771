"""Adapters that run inside each system's virtual environment (stdlib and redis-py only)."""
