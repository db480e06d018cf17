import argparse
import json

import pytest
import yaml
from distill_helpers import SPARSE

from dit_sparse.distill.checkpoints import list_checkpoints
from dit_sparse.distill.cli import add_distill_parser, build_config, main
from dit_sparse.distill.config import ConfigError, DistillConfig


def _parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_distill_parser(sub)
    return parser.parse_args(["distill", *argv])


def test_parser_registers_distill_with_its_flags():
    args = _parse(["--teacher", "tiny-shapes", "--plan", "default", "--student-steps", "4", "--max-steps", "300",
                   "--out", "runs/ts4", "--fake-updates", "3", "--lr", "2e-5", "--fake-lr", "1e-4",
                   "--guidance", "4.5", "--dry-run"])
    assert args.command == "distill" and args.dry_run and callable(args.func)
    cfg = build_config(args)
    assert (cfg.teacher, cfg.plan, cfg.student_steps, cfg.max_steps, cfg.out) == ("tiny-shapes", "default", 4, 300,
                                                                                  "runs/ts4")
    assert (cfg.fake_updates, cfg.lr, cfg.fake_lr, cfg.guidance) == (3, 2e-5, 1e-4, 4.5)


def test_yaml_then_flags_then_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"lr": 3e-5, "max-steps": 10, "betas": [0.0, 0.9], "guidance": 2.0}))
    cfg = build_config(_parse(["--config", str(path), "--max-steps", "20", "--set", "betas=[0.5, 0.99]",
                               "--set", "block_size=[8, 8]"]))
    assert cfg.lr == 3e-5 and cfg.guidance == 2.0  # from the file
    assert cfg.max_steps == 20  # the flag wins over the file
    assert cfg.betas == [0.5, 0.99] and cfg.block_size == [8, 8]  # --set wins over both
    cfg.save(tmp_path / "saved.yaml")
    assert DistillConfig.load(tmp_path / "saved.yaml") == cfg


def test_bad_configuration_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        DistillConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="lr expects float"):
        DistillConfig.from_dict({"lr": "fast"})
    with pytest.raises(ConfigError, match="eta"):
        DistillConfig(eta=0.5).validate()
    assert main(["--set", "nonsense=1"]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert main(["--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_cli_run_resume_export_and_dry_run(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--plan", SPARSE, "--set", "block_size=[8,8]", "--set", "executor=cpu", "--frames", "2", "--height",
              "8", "--width", "8", "--batch-size", "2", "--fake-updates", "1", "--quiet"]
    code = main(["--teacher", str(teacher_dir), "--student-steps", "2", "--max-steps", "2", "--out", str(out),
                 "--teacher-steps", "3", "--set", "validation_seeds=[0]", "--set", "validation_prompts=[a red circle "
                 "moving left on a dark background]", *common])
    assert code == 0
    assert "run it: dit-sparse generate --model" in capsys.readouterr().out
    assert (out / "validation" / "teacher_p0_s0.mp4").is_file()
    assert (out / "validation" / "step-2" / "student_p0_s0.mp4").is_file()
    assert json.loads((out / "validation" / "student.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert (out / "export" / "distill.json").is_file()
    saved = DistillConfig.load(out / "config.yaml")
    assert saved.student_steps == 2 and saved.block_size == [8, 8]

    # resume: the saved configuration, a longer run
    assert main(["--resume", str(out), "--max-steps", "3", "--no-validation", "--quiet"]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((out / "export" / "distill.json").read_text())["distill_steps"] == 3
    capsys.readouterr()

    assert main(["--resume", str(out), "--export-only", "--quiet"]) == 0
    assert "exported the student of step 3" in capsys.readouterr().out

    assert main(["--teacher", str(teacher_dir), "--student-steps", "2", "--max-steps", "100", "--out",
                 str(tmp_path / "dry"), "--dry-run", *common]) == 0
    text = capsys.readouterr().out
    assert "s per step (measured) x 100 steps" in text and "measured peak" in text
    assert not (tmp_path / "dry" / "checkpoints").exists()


def test_distill_is_a_subcommand_of_the_main_cli(tmp_path, capsys):
    from dit_sparse.cli import main as dit_sparse_main

    with pytest.raises(SystemExit) as e:
        dit_sparse_main(["distill", "--help"])
    assert e.value.code == 0
    assert "--student-steps" in capsys.readouterr().out
    assert dit_sparse_main(["distill", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err


def test_config_that_is_not_yaml_names_the_file_and_position(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("bogus: [1,")
    assert main(["--config", str(path)]) == 2
    assert f"{path}: not valid YAML at line 1, column 11" in capsys.readouterr().err
    assert main(["--set", "betas=[0,"]) == 2
    assert "--set 'betas=[0,': not valid YAML" in capsys.readouterr().err


def test_export_only_needs_a_run_with_a_checkpoint(tmp_path, capsys):
    assert main(["--export-only", "--out", str(tmp_path / "new")]) == 2
    assert "give the run folder with --resume DIR" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--resume", str(tmp_path / "empty"), "--export-only"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "empty" / "export").exists()


def test_out_that_is_an_existing_file_is_refused_before_loading(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    assert main(["--teacher", str(tmp_path / "missing"), "--out", str(taken)]) == 2
    assert f"--out {taken} is an existing file; --out takes a folder" in capsys.readouterr().err


def test_errors_name_the_distill_options_not_generates(teacher_dir, tmp_path, capsys):
    assert main(["--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --teacher: ") and "--model" not in err
    assert main(["--teacher", str(teacher_dir), "--plan", "diagnal", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--plan: 'diagnal' is neither a plan file nor a strategy" in err and "--plans" not in err
