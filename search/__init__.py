"""dit_sparse.search (placeholder package; see the issues)."""
