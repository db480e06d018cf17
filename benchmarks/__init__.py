"""The repository's benchmarks: part of a source checkout, not of the installed package.

bench_e2e, bench_speed and bench_kernels are what `dit-sparse bench e2e|speed|kernels` run (dit_sparse/cli.py
imports them from the checkout of an editable install, `pip install -e .`); the other files are scripts, run as
`python benchmarks/NAME.py` from the repository root.
"""
