"""Sparse plans under diffusers' context parallelism: Ulysses, ring, and both (docs/parallel.md).

topology: this rank's place in diffusers' mesh; ulysses: the heads <-> sequence all-to-all; ring: which key/value
shards a layout needs and their exchange; attention: the attention of one module, in parallel. Import the modules
themselves: this package imports nothing at import time (attend imports ring, and attention imports attend).
"""
