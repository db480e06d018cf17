import torch
from distill_helpers import make_distiller


def test_fake_score_loss_on_a_frozen_student_falls(teacher_dir, tmp_path):
    """With the student frozen, the fake score fits the student's samples: its loss on fixed draws falls >= 10%."""
    d = make_distiller(teacher_dir, tmp_path, fake_lr=1e-2, batch_size=4, guidance=1.0)
    student = {k: v.clone() for k, v in d.roles.student.state_dict().items()}

    def held_out_loss():
        with torch.no_grad():
            return sum(float(d.fake_loss(d.draw(d._generator(10_000 + i, 0, 0, 0)))) for i in range(6)) / 6

    before = held_out_loss()
    for i in range(120):  # about 4 s on 2 CPU cores
        d.fake_update(i, 0)
    after = held_out_loss()
    assert after <= 0.9 * before, (before, after)
    assert all(torch.equal(v, student[k]) for k, v in d.roles.student.state_dict().items())
