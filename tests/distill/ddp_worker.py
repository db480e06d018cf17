"""Run by test_ddp under `torchrun --nproc_per_node 2` (gloo on CPU): train a few steps, report per-rank state."""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(teacher: str, out: str, result: str) -> None:
    import torch.distributed as dist
    from distill_helpers import make_config

    from dit_sparse.distill import Distiller

    torch.set_num_threads(1)
    cfg = make_config(teacher, out, max_steps=3, checkpoint_every=2, cpu=True)
    d = Distiller(cfg, progress=False)
    local = [d.train_step() for _ in range(2)]
    d.save_checkpoint()
    d.train()  # the loop: step 3, reduced metrics, final checkpoint
    rank = d.accelerator.process_index
    mine = {"rank": rank, "world": d.accelerator.num_processes, "backend": dist.get_backend(),
            "student": digest(d.roles.student), "fake": digest(d.roles.fake), "teacher": digest(d.roles.teacher),
            "ema": hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(d.ema.shadow.items()))).hexdigest(),
            "losses": [[r["loss_fake"], r["loss_student"]] for r in local]}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(result).write_text(json.dumps(gathered))
    # Skip interpreter shutdown: gloo's worker threads can still hold tensors while Python is torn down, and the
    # process then aborts ("terminate called without an active exception") after a run that succeeded, while
    # destroy_process_group() first (torch 2.13) hung in about one run in three here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
