"""`python -m dit_sparse.search` (and `accelerate launch -m dit_sparse.search`, `torchrun -m dit_sparse.search`):
the search command; several launched processes split the calibration prompts."""

import sys

from dit_sparse.cli import main

sys.exit(main(["search", *sys.argv[1:]]))
