"""dit_sparse.distill (placeholder package; see the issues)."""
