"""The kernel benchmark's pieces on a tiny CPU problem (the real sizes run from benchmarks/bench_kernels.py)."""

import json

import pytest
import torch

from dit_sparse.cli import checkout_module
from dit_sparse.layout import Grid

bench = checkout_module("benchmarks.bench_kernels")


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_random_layout_hits_the_density(density):
    layout = bench.random_layout(4096, 256, 128, 2, density, "cpu")
    assert abs(layout.density() - density) <= 0.05


def test_bench_shape_and_outputs(tmp_path):
    records = bench.bench_shape(torch.device("cpu"), 2, 16, Grid(2, 8, 16), [0.5, 1.0], torch.float32,
                                backward=False, fp8=False, budget_s=0.01)
    impls = {r["impl"] for r in records}
    assert impls == {"sdpa", "cpu"}
    ours = [r for r in records if r["impl"] == "cpu"]
    assert all(r["ms"] > 0 and r["tflops_dense_equiv"] >= r["tflops_executed"] for r in ours)
    assert [r for r in ours if r["density"] == 1.0][0]["linearity"] == 1.0
    env = bench.environment(torch.device("cpu"))
    json_path, csv_path = bench.write(records, env, tmp_path)
    assert json.loads(json_path.read_text())["environment"]["torch"] == torch.__version__
    assert csv_path.read_text().startswith("heads,head_dim,seq,impl")
    assert "speedup_vs_dense_sdpa" in bench.table(records, env)


def test_tile_sweep_script_runs_in_the_interpreter(tmp_path):
    """benchmarks/bench_tiles.py (run on GPUs) checked end to end on its tiny interpreter shape."""
    module = checkout_module("benchmarks.bench_tiles")
    out = tmp_path / "tiles.json"
    assert module.main(["--device", "cpu", "--tiles", "64x64", "64x32", "128x64", "--densities", "1.0", "0.5",
                        "--budget", "0.01", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    records = result["records"]
    # 128x64 does not divide the interpreter's 64x64 layout blocks: skipped, not run.
    assert {(r["tile"], r["variant"]) for r in records} == {("64x64", "float32"), ("64x32", "float32")}
    assert len(records) == 4 and all(r["ms"] > 0 and r["speedup_vs_16bit"] == 1.0 for r in records)
    sparse, dense = sorted({r["density"] for r in records})  # executed block density of the random layouts
    assert dense == 1.0 and abs(sparse - 0.5) < 0.1
    with pytest.raises(SystemExit):
        module.main(["--tiles", "128by64"])
    # docs/results.md renders such a file (when a GPU session commits one) row by row.
    render = checkout_module("benchmarks.results_sections")
    assert render.benchmark_name(result) in render.RENDERERS
    lines = render.render_tiles(render.ROOT / "benchmarks" / "results" / "tiles.json", result)
    assert lines[0].startswith("**Forward kernel per tile**") and "S=200" in lines[0]
    assert len([line for line in lines if line.startswith("| 64x")]) == 4
