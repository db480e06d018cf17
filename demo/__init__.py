"""dit_sparse.demo (placeholder package; see the issues)."""
