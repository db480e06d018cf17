"""`dit-sparse bench e2e` end to end on a tiny tiny-shapes pipeline saved locally (random weights, 2 steps)."""

import json

import numpy as np
import pytest

from dit_sparse.cli import checkout_module, main
from dit_sparse.evaluation import CEILING_LABEL
from dit_sparse.zoo.model import TinyShapesConfig, build_pipeline
from dit_sparse.zoo.pipeline import weights_id

TINY = TinyShapesConfig(num_layers=2, num_attention_heads=2, attention_head_dim=8, ffn_dim=32, freq_dim=16,
                        text_dim=16, text_layers=1, text_heads=2, text_ff=32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny"
    build_pipeline(TINY, seed=0).save_pretrained(str(path))
    return path


def test_bench_e2e_writes_one_record_per_plan_table_and_plot(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "e2e", "--model", str(tiny_dir), "--plans", "diagonal:window=[0,1,1]", "dense",
                 "--num-prompts", "2", "--steps", "2", "--out", str(out)])
    assert code == 0
    records = json.loads((out / "results.json").read_text())
    assert isinstance(records, list) and [r["plan"] for r in records][0] == "dense" and len(records) == 3
    for r in records:  # every record carries the run's metadata
        assert r["benchmark"] == "bench e2e" and r["prompts"] == 2 and r["hardware"]["cpus"] >= 1
        assert r["weights_id"] == weights_id(tiny_dir)  # so a docs/results.md table from earlier weights is flagged
        assert r["default_plan_id"] is None  # no `default` plan in this run
        assert r["seconds"] > 0 and r["attention_seconds"] > 0
        assert r["caption_accuracy"] is not None and 0.0 <= r["caption_accuracy"] <= 1.0
    dense, sparse, dense_again = records
    assert dense["speedup"] == 1.0 and dense["executed_density"] == 1.0
    assert dense["psnr"] is None and dense["psnr_note"].startswith("exact")  # identical: no Infinity in the file
    assert 0.0 < sparse["executed_density"] < 1.0  # frame-local: the other frames' key blocks are skipped
    assert np.isfinite(sparse["psnr"])
    # A dense plan runs every attention, except that at the second step the first block's uncond call takes the
    # cond call's output (the same input in both branches): 1 of 2 steps x 2 branches x 2 layers. Same seeds, same
    # video.
    assert dense_again["plan"] == "dense #2" and dense_again["executed_density"] == pytest.approx(7 / 8)
    assert dense_again["psnr"] is None and dense_again["psnr_note"].startswith("exact")
    assert dense_again["ssim"] == pytest.approx(1.0) and "partial" not in dense_again
    assert (out / "speedup_vs_psnr.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| diagonal" in table and table in capsys.readouterr().out + "\n"
    assert "| dense | " in table and "| exact |" in table  # an exact PSNR is still shown as "exact"
    results = checkout_module("benchmarks.bench_e2e")
    assert results.records_of(results.grouped(records)) == records


def test_bench_e2e_records_which_default_plan_ran(tmp_path):
    from dit_sparse.plan_spec import default_plan_id

    out = tmp_path / "bench"  # the shipped tiny-shapes model: the default plan is made for it
    assert main(["bench", "e2e", "--plans", "default", "--num-prompts", "1", "--steps", "2", "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())
    shipped = default_plan_id("TinyShapesPipeline")
    assert len(shipped) == 12 and all(r["default_plan_id"] == shipped for r in records)


def test_bench_e2e_ceiling_skips_every_covered_head_and_reports_speed_only(tiny_dir, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "e2e", "--model", str(tiny_dir), "--plans", "diagonal:window=[0,1,1]", "--ceiling",
                 "--num-prompts", "1", "--steps", "2", "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["plan"] for r in records] == ["dense", "diagonal:window=[0,1,1]", CEILING_LABEL]
    ceiling = records[-1]
    assert ceiling["executed_density"] == 0.0 and ceiling["seconds"] > 0 and ceiling["speedup"] > 0
    assert ceiling["psnr"] is None and ceiling["ssim"] is None and ceiling["caption_accuracy"] is None
    assert f"| {CEILING_LABEL} |" in (out / "results.md").read_text() and "n/a" in (out / "results.md").read_text()
    assert (out / "speedup_vs_psnr.png").stat().st_size > 0


def test_bench_e2e_bad_plan_is_one_clear_error(tiny_dir, tmp_path, capsys):
    assert main(["bench", "e2e", "--model", str(tiny_dir), "--plans", "nonsense", "--out", str(tmp_path)]) == 2
    assert "nonsense" in capsys.readouterr().err
    for option, value, message in (("--num-prompts", "-1", "--num-prompts must be positive"),
                                   ("--steps", "0", "--steps must be positive"),
                                   ("--dtype", "fp64", "--dtype must be one of")):
        assert main(["bench", "e2e", "--model", str(tiny_dir), option, value, "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    assert main(["bench", "e2e", "--model", str(tiny_dir), "--plans", "diagnal", "--out", str(tmp_path)]) == 2
    assert "--plans: 'diagnal' is neither a plan file nor a strategy" in capsys.readouterr().err
    assert main(["bench", "e2e", "--model", str(tiny_dir), "--plans", "diagonal:window=1,0.25,0.25",
                 "--out", str(tmp_path)]) == 2
    assert "lists go in brackets" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    for command in (["e2e", "--model", str(tiny_dir)], ["speed"], ["kernels", "--quick"]):
        assert main(["bench", *command, "--out", str(tmp_path / "a-file")]) == 2
        assert "is an existing file; --out takes a folder" in capsys.readouterr().err


def test_table_cells_say_exact_for_identical_videos_and_na_for_missing_values():
    from dit_sparse.metrics import PSNR_EXACT, format_metric

    assert format_metric(float("inf"), ".1f") == "exact"  # result files written before strict JSON
    assert format_metric(None, ".1f", PSNR_EXACT) == "exact"
    assert format_metric(None, ".1f", "frames too small for SSIM (2x2)") == "n/a"
    assert format_metric(None, ".1f") == "n/a"
    assert format_metric(29.94, ".1f") == "29.9"
    assert format_metric(0.5, ".0%") == "50%"


def _strict_json(path):
    def refuse(constant):
        pytest.fail(f"{path} holds {constant}, which strict JSON parsers reject")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_results_json_is_strict_and_rewritten_after_every_prompt(tiny_dir, tmp_path, capsys, monkeypatch):
    """A fault late in a long run keeps what was measured: results.json is rewritten (atomically) after each
    prompt and seed, marked partial; no Infinity in it (an exact PSNR is null with a note)."""
    import dit_sparse.evaluation as evaluation

    real, calls = evaluation.timed_generation, []

    def timing(*args):
        calls.append(1)
        if len(calls) == 3:  # the first run of the second prompt
            raise evaluation.ArgumentError("a late fault")
        return real(*args)

    monkeypatch.setattr(evaluation, "timed_generation", timing)
    out = tmp_path / "bench"
    assert main(["bench", "e2e", "--model", str(tiny_dir), "--plans", "diagonal:window=[0,1,1]", "--num-prompts",
                 "2", "--steps", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: a late fault"
    records = _strict_json(out / "results.json")
    assert [r["plan"] for r in records] == ["dense", "diagonal:window=[0,1,1]"]
    assert all(r["partial"] == "1 of 2 prompt x seed runs" for r in records)
    assert records[0]["psnr"] is None and records[0]["psnr_note"].startswith("exact")
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_a_late_write_failure_names_the_file_and_keeps_the_others(tiny_dir, tmp_path, capsys, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    out = tmp_path / "bench"
    assert main(["bench", "e2e", "--model", str(tiny_dir), "--plans", "diagonal:window=[0,1,1]", "--num-prompts",
                 "1", "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: could not write {out / 'speedup_vs_psnr.png'}: no space left on device"
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]  # no temporary file left
    assert "partial" not in _strict_json(out / "results.json")[0]


@pytest.mark.parametrize("command", [["e2e"], ["speed"], ["kernels", "--quick"]])
def test_read_only_out_is_found_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch, command):
    import errno

    import dit_sparse.atomic as atomic
    import dit_sparse.evaluation as evaluation

    bench_speed = checkout_module("benchmarks.bench_speed")

    def read_only(folder):
        raise OSError(errno.EROFS, "Read-only file system")

    def no_work(*args, **kwargs):
        pytest.fail("work started before the output folder was checked")

    monkeypatch.setattr(atomic, "_probe", read_only)
    monkeypatch.setattr(evaluation, "load_model", no_work)
    monkeypatch.setattr(bench_speed, "build", no_work)
    out = tmp_path / "ro"
    model = ["--model", str(tiny_dir)] if command == ["e2e"] else []
    assert main(["bench", *command, *model, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: could not write to --out {out}: read-only file system (checked before any work; give a " \
                  "writable --out)\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["binary", "fifo", "device", "folder"])
def test_prompts_that_are_not_a_text_file_are_one_line(tiny_dir, tmp_path, capsys, monkeypatch, kind):
    """A binary --prompts file was a UnicodeDecodeError; a FIFO hung; /dev/zero filled the memory."""
    import os

    import dit_sparse.evaluation as evaluation

    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    path = tmp_path / "prompts"
    if kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = "/dev/zero"
    else:
        path.mkdir()
    assert main(["bench", "e2e", "--model", str(tiny_dir), "--prompts", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --prompts: {path} is ") and err.count("\n") == 1
    assert {"binary": "not a text file (not UTF-8 at byte 0)", "fifo": "not a regular file", "device":
            "not a regular file", "folder": "is a directory"}[kind] in err


def test_a_model_too_large_for_the_cpu_is_refused_before_generating(tiny_dir, tmp_path, capsys, monkeypatch):
    import dit_sparse.evaluation as evaluation
    import dit_sparse.workload as workload

    monkeypatch.setattr(workload, "CPU_MAX_TOKENS", 1000)
    monkeypatch.setattr(evaluation, "warm_up", lambda *a, **k: pytest.fail("generation started"))
    assert main(["bench", "e2e", "--model", str(tiny_dir), "--steps", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: 8 frames of 32x32 px is 2,048 video tokens (grid 8x16x16)")
    assert "more than 1,000 video tokens on CPU" in err and "--force" in err


def test_mistyped_model_folder_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "e2e", "--model", "./mymodel", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: --model: no such model folder ./mymodel (and it is not a hub id")
