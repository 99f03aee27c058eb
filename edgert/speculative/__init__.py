"""Drafters and the per-step verification tree: pure data over token ids (no backend)."""
