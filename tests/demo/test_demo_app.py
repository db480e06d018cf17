"""build_app without a server, the untrained-model fallback, light imports, and the `demo` command line."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest


def test_build_app_has_the_compare_endpoint_and_a_queue(backend):
    import gradio as gr

    from dit_sparse.demo.app import build_app

    app = build_app(backend=backend)
    assert isinstance(app, gr.Blocks)
    names = [d.api_name for d in app.fns.values()]
    assert "compare" in names
    compare = next(d for d in app.fns.values() if d.api_name == "compare")
    assert compare.concurrency_limit == 1 and compare.queue  # a second visitor waits for the first
    assert [c.label for c in compare.inputs][:6] == ["Prompt", "Seed", "Steps", "Guidance",
                                                     compare.inputs[4].label, "Frames"]
    assert len(compare.outputs) == 8
    assert app._queue.max_size == 16
    assert app.demo_backend is backend and app.demo_callbacks.backend is backend


def test_warning_banner_only_when_the_model_is_untrained():
    from dit_sparse.demo.app import build_app
    from dit_sparse.demo.backend import DemoBackend
    from dit_sparse.demo.model import UNTRAINED_WARNING
    from dit_sparse.zoo import build_pipeline

    def banners(app):
        return [c for c in app.blocks.values() if getattr(c, "elem_id", None) == "model-warning"]

    warned = build_app(backend=DemoBackend(pipe=build_pipeline(), warning=UNTRAINED_WARNING))
    assert len(banners(warned)) == 1 and "untrained" in banners(warned)[0].value
    assert banners(build_app(backend=DemoBackend(pipe=build_pipeline()))) == []


def test_tiny_shapes_falls_back_to_the_untrained_architecture(monkeypatch, tmp_path):
    from dit_sparse.demo.model import UNTRAINED_WARNING, load_demo_model
    from dit_sparse.zoo import pipeline as zoo_pipeline

    monkeypatch.setattr(zoo_pipeline, "WEIGHTS_DIR", tmp_path / "missing")
    pipe, warning = load_demo_model("tiny-shapes", "cpu", "float32")
    assert type(pipe).__name__ == "TinyShapesPipeline" and warning == UNTRAINED_WARNING

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{ not json")
    monkeypatch.setattr(zoo_pipeline, "WEIGHTS_DIR", broken)
    pipe, warning = load_demo_model("tiny-shapes", "cpu", "float32")
    assert pipe is not None and "could not be loaded" in warning


def test_tiny_shapes_uses_the_trained_weights_when_present(monkeypatch, tmp_path):
    from dit_sparse.demo.model import load_demo_model
    from dit_sparse.zoo import build_pipeline
    from dit_sparse.zoo import pipeline as zoo_pipeline

    saved = tmp_path / "tiny-shapes"
    build_pipeline(seed=3).save_pretrained(saved)
    monkeypatch.setattr(zoo_pipeline, "WEIGHTS_DIR", saved)
    calls = []
    real = zoo_pipeline.load_tiny_shapes
    monkeypatch.setattr("dit_sparse.zoo.load_tiny_shapes", lambda **kw: calls.append(kw) or real(**kw))
    pipe, warning = load_demo_model("tiny-shapes", "cpu", "float32")
    assert warning is None and len(calls) == 1


def test_limits_and_plans_for_a_diffusers_video_pipeline():
    """Any supported diffusers pipeline: limits from its call defaults and VAE, no shipped plan, uniform plans."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_models import tiny_wan_pipeline

    from dit_sparse.demo.backend import DemoBackend

    b = DemoBackend(pipe=tiny_wan_pipeline(), model="tiny-wan")
    try:
        lim = b.limits
        assert (lim.default_height, lim.default_width, lim.default_frames, lim.default_steps) == (480, 832, 81, 50)
        assert lim.multiple == 16 and lim.max_tokens is None and "480x832" in lim.resolutions()
        assert all(b.parse_resolution(r) for r in lim.resolutions())
        assert (b.token_grid(480, 832, 81).frames, b.token_grid(480, 832, 81).height) == (21, 30)  # Wan 480p
        assert b.shipped_plans == {} and b.default_source == "uniform strategy"
        assert Path(b.preview_plan("uniform strategy", None, None, "diagonal", 0.25, "480x832", 81)).is_file()
        assert "WanPipeline" in b.describe()
    finally:
        b.close()


def test_bad_model_arguments_are_clear_errors():
    from dit_sparse.demo.inputs import DemoError
    from dit_sparse.demo.model import load_demo_model

    with pytest.raises(DemoError, match="--dtype must be one of"):
        load_demo_model("tiny-shapes", "cpu", "float8")
    with pytest.raises(DemoError, match="no such model folder /no/such/model/dir"):
        load_demo_model("/no/such/model/dir", "cpu", "float32")
    with pytest.raises(DemoError, match="neither a local directory nor a hub id"):
        load_demo_model("mymodel", "cpu", "float32")


def test_importing_the_package_does_not_import_gradio():
    code = ("import sys, dit_sparse, dit_sparse.demo, dit_sparse.demo.cli, dit_sparse.demo.backend; "
            "print('gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    assert out.strip() == "False"


def _parse(argv):
    from dit_sparse.demo.cli import add_demo_parser

    parser = argparse.ArgumentParser(prog="dit-sparse")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    return parser.parse_args(argv)


def test_demo_command_options():
    from dit_sparse.demo.cli import run_demo

    args = _parse(["demo"])
    assert (args.model, args.plan, args.device, args.dtype, args.host, args.port, args.share) == (
        "tiny-shapes", None, "cpu", "float32", "127.0.0.1", 7860, False)
    assert args.func is run_demo
    args = _parse(["demo", "--model", "owner/name", "--plan", "p.plan.json", "--device", "cuda", "--dtype", "bf16",
                   "--host", "0.0.0.0", "--port", "8000", "--share"])
    assert (args.model, args.plan, args.device, args.dtype, args.host, args.port, args.share) == (
        "owner/name", "p.plan.json", "cuda", "bf16", "0.0.0.0", 8000, True)


def test_demo_command_builds_and_launches(monkeypatch, capsys):
    import dit_sparse.demo.app as app_module

    launched = {}
    monkeypatch.setattr(app_module, "launch_app", lambda app, **kw: launched.update(kw, app=app))
    args = _parse(["demo", "--plan", "diagonal", "--port", "7999"])
    assert args.func(args) == 0
    assert launched["host"] == "127.0.0.1" and launched["port"] == 7999 and launched["share"] is False
    backend = launched["app"].demo_backend
    assert (backend.default_source, backend.default_strategy) == ("uniform strategy", "diagonal")
    assert "http://127.0.0.1:7999/" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["demo", "--dtype", "float8"], "--dtype must be one of"),
    (["demo", "--plan", "/no/such.plan.json"], "'/no/such.plan.json' is neither a plan file nor a strategy"),
    (["demo", "--plan", "diagnal"], "'diagnal' is neither a plan file nor a strategy (known strategies: "),
    (["demo", "--port", "99999"], "--port must be a TCP port in 1..65535, got 99999"),
    (["demo", "--port", "0"], "--port must be a TCP port in 1..65535, got 0"),
    (["demo", "--model", "/no/such/model/dir"], "no such model folder /no/such/model/dir (and it is not a hub id"),
    (["demo", "--model", "./mymodel"], "error: --model: no such model folder ./mymodel (and it is not a hub id: "),
])
def test_demo_command_bad_arguments(monkeypatch, capsys, argv, message):
    import dit_sparse.demo.app as app_module

    monkeypatch.setattr(app_module, "launch_app", lambda *a, **k: pytest.fail("must not launch"))
    args = _parse(argv)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err


@pytest.mark.parametrize("host,message", [
    ("256.1.1.1", "--host 256.1.1.1 is not a valid IP address"),
    ("1.2.3", "--host 1.2.3 is not a valid IP address"),
    ("192.0.2.1", "--host 192.0.2.1 is not an address of this machine"),  # TEST-NET-1: no machine has it
    ("no-such-host.invalid", "--host no-such-host.invalid is neither an IP address nor a name this machine can "
                             "resolve"),
    ("", "--host is empty"),
])
def test_a_bad_host_is_blamed_before_the_model_loads(monkeypatch, capsys, host, message):
    """--host 256.1.1.1 loaded the model, then blamed the port."""
    import dit_sparse.demo.app as app_module

    monkeypatch.setattr(app_module, "build_app", lambda **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(app_module, "launch_app", lambda *a, **k: pytest.fail("must not launch"))
    args = _parse(["demo", "--host", host])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "--port" not in err


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0.0.0.0"])
def test_good_hosts_pass_the_check(host):
    from dit_sparse.demo.cli import check_host

    assert check_host(host) is None


def test_plan_file_for_another_model_is_refused_at_start(tmp_path, capsys):
    from dit_sparse.plan import ModelFingerprint, SparsePlan

    path = SparsePlan(ModelFingerprint("WanTransformer3DModel", 30, 12, 128)).save(tmp_path / "wan.plan.json")
    args = _parse(["demo", "--plan", str(path)])
    assert args.func(args) == 2
    assert "num_layers: plan has 30, model has 4" in capsys.readouterr().err
