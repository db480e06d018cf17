import json
import os
import subprocess
import sys
from pathlib import Path

from dit_sparse.distill.checkpoints import list_checkpoints

HERE = Path(__file__).resolve().parent


def test_two_processes_on_cpu_train_and_stay_in_sync(teacher_dir, tmp_path):
    result = tmp_path / "ranks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(teacher_dir), str(tmp_path / "run"), str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = json.loads(result.read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert ranks[0]["backend"] == "gloo"
    for key in ("student", "fake", "teacher", "ema"):
        assert ranks[0][key] == ranks[1][key], key  # DDP kept every role identical across processes
    assert ranks[0]["losses"] != ranks[1]["losses"]  # while each rank trained on its own draws
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2", "checkpoint-3"]
    assert {p.name for p in (tmp_path / "run" / "checkpoints" / "checkpoint-3").iterdir()} >= {
        "random_states_0.pkl", "random_states_1.pkl"}
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3]
