"""`python -m dit_sparse ...`, the form torchrun starts: `torchrun --nproc-per-node 2 -m dit_sparse generate ...`."""

import sys

from .cli import main

sys.exit(main())
