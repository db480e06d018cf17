"""`python -m dit_sparse.distill` (and `accelerate launch -m dit_sparse.distill`): the distill command."""

import sys

from .cli import main

sys.exit(main())
