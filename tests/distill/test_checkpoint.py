"""Checkpoints: resume reproduces the uninterrupted run exactly; a crash mid-checkpoint keeps the previous one."""

import json

import pytest
import torch
from distill_helpers import make_distiller

from dit_sparse.distill.checkpoints import list_checkpoints


def _run(d):
    """Train to max_steps the way train() does (without validation/export), returning each step's metrics."""
    records = []
    while d.state.step < d.cfg.max_steps:
        records.append(d.train_step())
        if d.cfg.checkpoint_every and d.state.step % d.cfg.checkpoint_every == 0:
            d.save_checkpoint()
    return records


def _assert_same_state(a, b):
    for name in ("student", "fake"):
        sa, sb = getattr(a.roles, name).state_dict(), getattr(b.roles, name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    for k, v in a.ema.shadow.items():
        assert torch.equal(v, b.ema.shadow[k]), k
    assert a.ema.num_updates == b.ema.num_updates
    for opt_a, opt_b in ((a.opt_g, b.opt_g), (a.opt_f, b.opt_f)):
        sa, sb = opt_a.state_dict(), opt_b.state_dict()
        assert sa["param_groups"] == sb["param_groups"]  # learning rates, betas, step counts
        for i, st in sa["state"].items():
            for k, v in st.items():
                assert torch.equal(v, sb["state"][i][k]), (i, k)
    assert a.sch_g.get_last_lr() == b.sch_g.get_last_lr() and a.sch_f.get_last_lr() == b.sch_f.get_last_lr()
    assert a.state.step == b.state.step and a.state.fake_updates == b.state.fake_updates


def test_resume_reproduces_the_uninterrupted_run(teacher_dir, tmp_path):
    kw = dict(max_steps=4, checkpoint_every=2, warmup_steps=3)  # warm-up: the learning rate moves every step
    straight = make_distiller(teacher_dir, tmp_path / "a", **kw)
    ref = _run(straight)

    first = make_distiller(teacher_dir, tmp_path / "b", **{**kw, "max_steps": 2})
    _run(first)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-2"]
    # a different process would start from scratch: scramble the global RNGs to be sure nothing leaks
    torch.manual_seed(12345)
    resumed = make_distiller(teacher_dir, tmp_path / "b", resume=True, **kw)
    assert resumed.state.step == 2
    _assert_same_state(resumed, _partial(straight, teacher_dir, tmp_path, kw))
    rest = _run(resumed)
    assert [r["loss_fake"] for r in rest] == [r["loss_fake"] for r in ref[2:]]
    assert [r["loss_student"] for r in rest] == [r["loss_student"] for r in ref[2:]]
    assert [r["lr"] for r in rest] == [r["lr"] for r in ref[2:]]
    _assert_same_state(straight, resumed)


def _partial(straight, teacher_dir, tmp_path, kw):
    """The uninterrupted run's state after 2 steps, rebuilt from its own step-2 checkpoint (kept: keep=2)."""
    ckpts = list_checkpoints(tmp_path / "a")
    assert [p.name for p in ckpts] == ["checkpoint-2", "checkpoint-4"]
    other = make_distiller(teacher_dir, tmp_path / "a2", **kw)
    other.resume(ckpts[0])
    return other


def test_crash_during_checkpoint_leaves_previous_checkpoint_usable(teacher_dir, tmp_path, monkeypatch):
    kw = dict(max_steps=3, checkpoint_every=1, keep_checkpoints=2)
    reference = _run(make_distiller(teacher_dir, tmp_path / "ref", **kw))

    out = tmp_path / "crash"
    d = make_distiller(teacher_dir, out, **kw)
    d.train_step()
    d.save_checkpoint()
    d.log({"step": 1})
    d.train_step()
    d.log({"step": 2})
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the process dies half-way through writing checkpoint-2
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise KeyboardInterrupt("killed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        d.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]  # the half-written one is not listed

    resumed = make_distiller(teacher_dir, out, resume=True, **kw)
    assert resumed.state.step == 1
    # the metrics of the lost step are dropped from the log
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    resumed.train()  # cleans the partial folder, runs steps 2-3, checkpoints
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]  # keep-limit 2
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert [r["loss_student"] for r in log[1:]] == [r["loss_student"] for r in reference[1:]]
    assert [r["loss_fake"] for r in log[1:]] == [r["loss_fake"] for r in reference[1:]]
