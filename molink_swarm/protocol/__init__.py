"""How peers talk: guarded RPC streams (see streams.py)."""
