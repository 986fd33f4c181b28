"""Leaf helpers every layer may use: durable file writes and digests, spawned children."""
