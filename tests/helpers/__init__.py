"""Shared test helpers: workspaces, data, tiny models, DVC projects, servers."""
