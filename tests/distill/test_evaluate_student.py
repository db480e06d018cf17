"""The student evaluation's table: rows, the comparison with the 50-step teacher, and the caution that a weak
teacher makes the accuracy comparison empty."""

from dit_sparse.distill.evaluate_student import markdown


def _row(acc, steps, guidance, seconds):
    return {"caption_accuracy": acc, "steps": steps, "guidance": guidance, "seconds_per_clip": seconds,
            "per_attribute": {"colour": 1.0, "shape": 0.5, "motion": 0.5, "background": 1.0}}


def _result(teacher_acc):
    return {"rows": {"student": _row(0.8, 4, 1.0, 0.2), "teacher_50": _row(teacher_acc, 50, 4.5, 10.0)},
            "student_vs_teacher_50": {"accuracy_points": round(100 * (0.8 - teacher_acc), 1),
                                      "wall_time_speedup": 50.0, "meets_target": True,
                                      "target": "within 5 points of the 50-step teacher at >= 10x less wall time"}}


def test_table_and_caution_for_a_weak_teacher():
    strong = markdown(_result(0.82))
    assert "| student | 4 | 1.0 | 0.800 |" in strong and "| teacher_50 | 50 | 4.5 | 0.820 |" in strong
    assert "-2.0 points, 50.0x less wall time" in strong and "caution" not in strong
    weak = markdown(_result(0.1))
    assert "caution: the 50-step teacher itself passes only 10% of the prompts" in weak
