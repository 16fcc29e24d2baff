"""Reaching peers: relays, reachability checks, hole punching, push channels, and each peer's route and RTT."""
