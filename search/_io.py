"""Atomic file writes (shared with the plan files)."""

from dit_sparse.atomic import atomic_path, write_json, write_text

__all__ = ["atomic_path", "write_json", "write_text"]
