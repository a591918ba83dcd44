"""Persistent state: key files in the agent home (and, later, LMDB stores)."""
