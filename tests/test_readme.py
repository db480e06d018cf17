"""The README stays true: its minimal example runs as written and CI runs its test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_minimal_example_runs_as_written(capsys):
    section = README.split("A minimal example that runs as written", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README-example", "exec"), {})
    printed = capsys.readouterr().out
    assert "diagonal" in printed and "executed" in printed


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    pytest_part = test_command.split("&&")[-1].strip()
    assert pytest_part in ci
    assert "pip install --quiet torch==2.13.0" in ci
    assert "dit-sparse generate" in blocks[0]


def test_results_section_is_rendered_from_the_result_files():
    import subprocess
    import sys

    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render_results.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
