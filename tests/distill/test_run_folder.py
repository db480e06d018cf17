"""The run folder: runs are runs (no silent mixing of two runs in one --out), resume after damage (a corrupted or
partial newest checkpoint, partial files a crash left, a torn metrics line), a full disk while writing, an --out
that cannot be written. Every refusal is one `error: ...` line with exit status 2, never a traceback."""

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from distill_helpers import SPARSE, make_distiller

from dit_sparse.distill.checkpoints import list_checkpoints
from dit_sparse.distill.cli import main
from dit_sparse.distill.config import DistillConfig
from dit_sparse.distill.runfolder import RunFolderError, WriteFailed


def _prompts(tmp_path) -> str:
    """Two training prompts: encoding tiny-shapes' full caption list would be most of a short test's time."""
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle moving left on a dark background\na blue square moving up on a dark background\n")
    return str(path)


def _flags(tmp_path, teacher_dir, max_steps=3):
    return ["--teacher", str(teacher_dir), "--plan", SPARSE, "--set", "block_size=[8,8]", "--set", "executor=cpu",
            "--frames", "2", "--height", "8", "--width", "8", "--batch-size", "2", "--fake-updates", "1",
            "--student-steps", "2", "--max-steps", str(max_steps), "--checkpoint-every", "1", "--prompts",
            _prompts(tmp_path), "--set", "validation_prompts=[a red circle]", "--no-validation", "--set",
            "export=false", "--quiet"]


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss_student"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _train(teacher_dir, tmp_path, out, **kw):
    """A finished 3-step run with checkpoint-2 and checkpoint-3 (keep 2) and 3 metrics lines."""
    d = make_distiller(teacher_dir, out, max_steps=3, checkpoint_every=1, fake_updates=1, prompts=_prompts(tmp_path),
                       validation_prompts=["a red circle"], **kw)
    d.train()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"] and _steps(out) == [1, 2, 3]
    return d


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# -- A: runs are runs --------------------------------------------------------------------------------------------
def test_out_that_holds_a_run_is_refused_unless_resumed_or_overwritten(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_flags(tmp_path, teacher_dir), "--out", str(out)]) == 0
    config, metrics = (out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    # the same --out again (another configuration): refused before anything loads, nothing touched
    assert main([*_flags(tmp_path, teacher_dir, max_steps=2), "--lr", "0.01", "--out", str(out)]) == 2
    assert _err_line(capsys) == (f"error: --out {out} already holds a run (config.yaml, metrics.jsonl, checkpoints): "
                                 f"continue it with --resume {out}, or replace it with --overwrite (removes that "
                                 "run's files)")
    assert (out / "config.yaml").read_text() == config and (out / "metrics.jsonl").read_text() == metrics
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]

    # --overwrite: the old run's files go first (other files stay), then a new run
    (out / "notes.txt").write_text("mine")
    assert main([*_flags(tmp_path, teacher_dir, max_steps=2), "--lr", "0.01", "--out", str(out), "--overwrite"]) == 0
    assert _steps(out) == [1, 2]  # not 1, 2, 3, 1, 2
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]  # the old checkpoint-3 is gone
    assert DistillConfig.load(out / "config.yaml").lr == 0.01 and (out / "notes.txt").read_text() == "mine"
    # ... so a later resume continues the new run, not the old run's checkpoint-3
    assert main(["--resume", str(out), "--max-steps", "3", "--quiet"]) == 0
    assert _steps(out) == [1, 2, 3] and DistillConfig.load(out / "config.yaml").lr == 0.01

    assert main(["--resume", str(out), "--overwrite"]) == 2
    assert _err_line(capsys) == "error: --overwrite starts a new run, --resume continues one: give one of them"


def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--resume", str(empty)]) == 2
    assert _err_line(capsys) == (f"error: --resume {empty}: not a run folder (no config.yaml); start a run there with "
                                 f"--out {empty}")
    assert list(empty.iterdir()) == []  # no fresh run started there

    started = tmp_path / "started"  # a run that stopped before its first checkpoint
    DistillConfig(out=str(started)).save(started / "config.yaml")
    assert main(["--resume", str(started)]) == 2
    assert _err_line(capsys) == (f"error: --resume {started}: no complete checkpoint in {started / 'checkpoints'} to "
                                 f"continue from; start it again with --out {started} --overwrite")
    assert main(["--resume", str(started), "--out", str(tmp_path / "elsewhere")]) == 2
    assert _err_line(capsys) == (f"error: --resume {started} continues the run in that folder; --out "
                                 f"{tmp_path / 'elsewhere'} would write it elsewhere: leave --out out")


# -- B: resume after damage --------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_resume_falls_back_to_the_newest_complete_checkpoint(teacher_dir, tmp_path, caplog, damage):
    out = tmp_path / "run"
    _train(teacher_dir, tmp_path, out)
    reference = _losses(out)
    weights = out / "checkpoints" / "checkpoint-3" / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncated":  # a copy or a write cut short: complete.json's sizes show it without loading
        with open(weights, "r+b") as f:
            f.truncate(size // 2)
    else:  # same size, damaged contents: only loading shows it
        weights.write_bytes(b"\xff" * size)
    # partial files a crash left mid-write: a checkpoint folder and an atomic write's temporary file
    (out / "checkpoints" / ".tmp-checkpoint-4").mkdir()
    (out / "checkpoints" / ".tmp-checkpoint-4" / "model.safetensors").write_bytes(b"partial")
    (out / ".metrics.jsonl.x1y2.tmp").write_text("partial")

    caplog.set_level(logging.WARNING)
    resumed = make_distiller(teacher_dir, out, resume=True, max_steps=3, checkpoint_every=1, fake_updates=1,
                             prompts=_prompts(tmp_path), validation_prompts=["a red circle"])
    assert resumed.state.step == 2
    assert not (out / "checkpoints" / ".tmp-checkpoint-4").exists() and not (out / ".metrics.jsonl.x1y2.tmp").exists()
    assert f"resume: {out / 'checkpoints' / 'checkpoint-3'} is damaged (" in caplog.text
    assert ("has %d bytes, %d were written" % (size // 2, size) if damage == "truncated" else "does not load: ") in \
        caplog.text
    assert "continuing from checkpoint-2 (step 2) instead of the damaged checkpoint-3" in caplog.text
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "checkpoints" / "damaged-checkpoint-3").is_dir()  # kept for a look, out of the way
    assert _steps(out) == [1, 2]
    resumed.train()  # repeats step 3 exactly as the uninterrupted run did
    assert _steps(out) == [1, 2, 3] and _losses(out)[3] == reference[3]


def test_resume_when_no_checkpoint_is_complete_is_one_error(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _train(teacher_dir, tmp_path, out)
    for ckpt in list_checkpoints(out):
        (ckpt / "model.safetensors").write_bytes(b"\xff" * (ckpt / "model.safetensors").stat().st_size)
    assert main(["--resume", str(out), "--quiet"]) == 2
    line = _err_line(capsys)
    assert line.startswith(f"error: --resume {out}: no checkpoint in {out / 'checkpoints'} loads (checkpoint-3: "
                           "does not load: ") and "; checkpoint-2: does not load: " in line
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]  # nothing moved or removed

    for ckpt in list_checkpoints(out):  # truncated: refused before anything loads
        with open(ckpt / "model.safetensors", "r+b") as f:
            f.truncate(10)
    assert main(["--resume", str(out), "--quiet"]) == 2
    assert _err_line(capsys) == (f"error: --resume {out}: no complete checkpoint in {out / 'checkpoints'} to continue "
                                 f"from (checkpoint-2, checkpoint-3: partial); start it again with --out {out} "
                                 "--overwrite")


def test_torn_metrics_lines(teacher_dir, tmp_path, caplog, monkeypatch):
    out = tmp_path / "run"
    _train(teacher_dir, tmp_path, out)
    good = (out / "metrics.jsonl").read_text().splitlines()
    kw = dict(max_steps=3, checkpoint_every=1, fake_updates=1, prompts=_prompts(tmp_path),
              validation_prompts=["a red circle"])

    # torn in the middle: not something a crash leaves at the end; an error naming the file and the line
    (out / "metrics.jsonl").write_text(good[0] + "\n" + good[1][:30] + "\n" + good[2] + "\n")
    with pytest.raises(RunFolderError, match=f"^{out / 'metrics.jsonl'} line 2 is not a metrics record "):
        make_distiller(teacher_dir, out, resume=True, **kw)

    # torn last line (a full disk mid-append), with a partial checkpoint on that same full disk: the resume
    # removes the partial checkpoint first (the space the metrics rewrite needs), then drops the torn line
    (out / "metrics.jsonl").write_text("\n".join(good) + "\n" + good[2].replace('"step": 3', '"step": 4')[:29])
    partial = out / "checkpoints" / ".tmp-checkpoint-4"
    partial.mkdir()
    import dit_sparse.atomic

    real_write_text = dit_sparse.atomic.write_text

    def full_unless_cleaned(path, text):
        if partial.exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(path, text)

    monkeypatch.setattr(dit_sparse.atomic, "write_text", full_unless_cleaned)
    caplog.set_level(logging.WARNING)
    resumed = make_distiller(teacher_dir, out, resume=True, **kw)
    assert resumed.state.step == 3 and not partial.exists()
    assert f"{out / 'metrics.jsonl'}: dropped its torn last line" in caplog.text
    assert (out / "metrics.jsonl").read_text().splitlines() == good


# -- C: a full disk ----------------------------------------------------------------------------------------------
def _no_space_torch_save():
    """torch.save as on a full disk: part of the file written, then the RuntimeError of its failing stream."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):
            Path(f).write_bytes(b"\0" * 4096)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, f, *args, **kwargs)

    return save


@pytest.mark.parametrize("fault", ["enospc", "torch_full_disk", "safetensors", "torch_other"])
def test_failed_checkpoint_write_is_one_line_and_leaves_no_partial(teacher_dir, tmp_path, capsys, monkeypatch,
                                                                   fault):
    import accelerate.utils.other
    from safetensors import SafetensorError

    out = tmp_path / "run"
    if fault == "enospc":
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if "checkpoint-2" in str(f):
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    elif fault in ("torch_full_disk", "torch_other"):
        monkeypatch.setattr(torch, "save", _no_space_torch_save())
        real_usage = shutil.disk_usage
        free = 0 if fault == "torch_full_disk" else 10 << 30  # torch names no errno: the free space tells
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=free))
    else:
        real_safe = accelerate.utils.other.safe_save_file

        def safe_save(tensors, filename, *args, **kwargs):
            if "checkpoint-2" in str(filename):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real_safe(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(accelerate.utils.other, "safe_save_file", safe_save)

    assert main([*_flags(tmp_path, teacher_dir), "--out", str(out)]) == 2
    line = _err_line(capsys)
    where = out / "checkpoints" / "checkpoint-2"
    if fault == "torch_other":
        assert line.startswith(f"error: could not write {where}: [enforce fail at inline_container.cc:672]")
    else:
        assert line == (f"error: no space left on device while writing {where} (removed the partial checkpoint; "
                        f"checkpoint-1 is intact: dit-sparse distill --resume {out} continues from it)")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-1"]  # no partial checkpoint
    monkeypatch.undo()
    assert main(["--resume", str(out), "--quiet"]) == 0
    assert _steps(out) == [1, 2, 3]


def test_full_disk_while_logging_or_exporting(teacher_dir, tmp_path, monkeypatch):
    import dit_sparse.distill.trainer as trainer
    from dit_sparse.plan import SparsePlan

    out = tmp_path / "run"
    d = make_distiller(teacher_dir, out, fake_updates=1, prompts=_prompts(tmp_path), validation_prompts=["a"])
    d.log({"step": 1})
    before = (out / "metrics.jsonl").read_bytes()

    class Full:
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def write(self, text):
            self.f.write(text[:10])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(trainer, "open", Full, raising=False)
    with pytest.raises(WriteFailed, match=f"^no space left on device while writing {out / 'metrics.jsonl'}$"):
        d.log({"step": 2, "loss_student": 0.5})
    assert (out / "metrics.jsonl").read_bytes() == before  # no torn line left
    monkeypatch.undo()

    def full_plan_save(self, path):
        Path(path).write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SparsePlan, "save", full_plan_save)
    with pytest.raises(WriteFailed, match=f"^no space left on device while writing {out / 'export'}$"):
        d.export()
    assert not (out / ".tmp-export").exists() and not (out / "export").exists()


def test_a_folder_is_swapped_in_whole_or_not_at_all(tmp_path, monkeypatch):
    """replace_folder (checkpoints, the export): the new folder takes the old one's place; a failed rename leaves
    the old folder where it was and names the destination."""
    from dit_sparse.atomic import WriteError, replace_folder

    dst, src = tmp_path / "export", tmp_path / ".tmp-export"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    src.mkdir()
    (src / "new.txt").write_text("new")
    assert replace_folder(src, dst) == dst
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and [p.name for p in dst.iterdir()] == ["new.txt"]

    src.mkdir()
    real_replace = os.replace

    def cross_device(a, b):
        if Path(a) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", cross_device)
    with pytest.raises(WriteError, match=f"^could not write {dst}: invalid cross-device link$"):
        replace_folder(src, dst)
    assert [p.name for p in dst.iterdir()] == ["new.txt"] and not (tmp_path / ".old-export").exists()


# -- D: an --out that cannot be written --------------------------------------------------------------------------
@pytest.fixture
def unwritable(tmp_path):
    """A folder no file can be created in (root ignores permission bits: then a folder under /sys, read-only)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder / "run"
        folder.chmod(0o755)
        return
    folder = Path("/sys/dit-sparse-distill-test")
    try:
        folder.mkdir()
    except OSError:
        yield folder / "run"
        return
    folder.rmdir()
    pytest.skip("no read-only folder to test with")


def test_unwritable_out_is_refused_before_anything_loads(teacher_dir, tmp_path, unwritable, capsys, monkeypatch):
    import dit_sparse.checks
    import dit_sparse.models

    def no_loading(*args, **kwargs):
        raise dit_sparse.checks.ArgumentError("loaded a model before checking --out")

    monkeypatch.setattr(dit_sparse.models, "load_model", no_loading)
    assert main([*_flags(tmp_path, teacher_dir), "--out", str(unwritable)]) == 2
    line = _err_line(capsys)
    assert line.startswith(f"error: could not write to --out {unwritable}: ") and "loaded a model" not in line
    assert line.endswith("(checked before any work; give a writable --out)")

    # a new folder is fine, and checking it leaves nothing behind
    new = tmp_path / "new" / "run"
    assert main([*_flags(tmp_path, teacher_dir), "--out", str(new)]) == 2
    assert "loaded a model before checking --out" in capsys.readouterr().err  # got as far as loading
    assert not (tmp_path / "new").exists()
