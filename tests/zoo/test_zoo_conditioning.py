import pytest

from dit_sparse.zoo import conditioning


@pytest.fixture
def caption_blind(monkeypatch):
    """Every caption of a batch gets the first caption's embedding: a model that ignores its caption."""
    real = conditioning.encode_text

    def same_embedding_for_all(tok, te, captions, **kw):
        one = real(tok, te, captions[:1], **kw)
        return one.expand(len(captions), *one.shape[1:]).contiguous()

    monkeypatch.setattr(conditioning, "encode_text", same_embedding_for_all)


def test_sensitivity_reports_every_attribute_at_every_noise_level_and_is_deterministic(tiny_pipe):
    a = conditioning.attribute_sensitivity(tiny_pipe, sigmas=(0.9, 0.5), num_captions=2)
    assert set(a) == {"colour", "shape", "motion", "background"}
    assert all(set(per) == {"0.9", "0.5"} and all(v >= 0 for v in per.values()) for per in a.values())
    assert max(v for per in a.values() for v in per.values()) > 0  # the random model's text path is live
    assert conditioning.attribute_sensitivity(tiny_pipe, sigmas=(0.9, 0.5), num_captions=2) == a


def test_a_model_that_ignores_its_caption_scores_zero(tiny_pipe, caption_blind):
    a = conditioning.attribute_sensitivity(tiny_pipe, sigmas=(0.9,), num_captions=2)
    assert all(v == 0 for per in a.values() for v in per.values())


def test_word_choice_reports_every_attribute_against_chance_and_is_deterministic(tiny_pipe):
    w = conditioning.word_choice_accuracy(tiny_pipe, sigmas=(0.9, 0.5), num_clips=2, draws=1)
    assert set(w) == {"colour", "shape", "motion", "chance"}
    assert w["chance"] == {"colour": 0.2, "shape": round(1 / 3, 4), "motion": round(1 / 7, 4)}
    assert all(set(w[n]) == {"0.9", "0.5"} and all(v in (0.0, 0.5, 1.0) for v in w[n].values())
               for n in ("colour", "shape", "motion"))
    assert conditioning.word_choice_accuracy(tiny_pipe, sigmas=(0.9, 0.5), num_clips=2, draws=1) == w


def test_word_choice_of_a_model_that_ignores_its_caption_is_zero_not_chance(tiny_pipe, caption_blind):
    w = conditioning.word_choice_accuracy(tiny_pipe, sigmas=(0.9,), num_clips=3, draws=1)
    assert all(w[n] == {"0.9": 0.0} for n in ("colour", "shape", "motion"))  # ties never count as a choice


def run_evaluation(pipe, tmp_path, *args):
    """Save ``pipe`` to ``tmp_path/m``, run ``evaluate`` on it in 2 steps with ``args``, and return its JSON."""
    import json

    from dit_sparse.zoo import evaluate

    pipe.save_pretrained(str(tmp_path / "m"))
    out = tmp_path / "eval.json"
    evaluate.main(["--model", str(tmp_path / "m"), "--steps", "2", "--threads", "1", "--out", str(out), *args])
    return json.loads(out.read_text())


def test_evaluation_records_attribute_sensitivity_and_the_weights_it_measured(tiny_pipe, tmp_path):
    from dit_sparse.zoo.pipeline import weights_id

    result = run_evaluation(tiny_pipe, tmp_path, "--heldout-prompts", "2", "--checker-clips", "4",
                            "--word-choice-clips", "1")
    assert result["weights_id"] == weights_id(tmp_path / "m") and result["heldout"]["n"] == 2
    assert set(result["attribute_sensitivity"]) == {"colour", "shape", "motion", "background"}
    assert set(result["word_choice"]) == {"colour", "shape", "motion", "chance"}


def test_evaluation_with_no_checker_clips_skips_the_checker_check(tiny_pipe, tmp_path):
    result = run_evaluation(tiny_pipe, tmp_path, "--heldout-prompts", "1", "--checker-clips", "0",
                            "--word-choice-clips", "0")
    assert "checker_ground_truth" not in result and result["heldout"]["n"] == 1


def test_evaluation_records_its_guidance_interval_and_refuses_a_bad_one(tiny_pipe, tmp_path, capsys):
    result = run_evaluation(tiny_pipe, tmp_path, "--heldout-prompts", "1", "--checker-clips", "0",
                            "--word-choice-clips", "0", "--guidance-interval", "0.3,0.9")
    assert result["guidance_interval"] == [0.3, 0.9]
    with pytest.raises(SystemExit):
        run_evaluation(tiny_pipe, tmp_path, "--guidance-interval", "0.9,0.3")
    assert "0 <= lo <= hi <= 1" in capsys.readouterr().err


def test_shape_breakdown_counts_confusions_and_non_circle_hits_per_motion():
    from dit_sparse.zoo.evaluate import summarize

    def row(prompt, found_shape):
        want = prompt.split()[2]
        return {"prompt": prompt, "ok": found_shape == want, "found": {"shape": found_shape},
                "matches": {"colour": True, "shape": found_shape == want, "motion": True, "background": True}}

    rows = [row("a red square moving left on a dark background", "circle"),
            row("a red triangle moving left on a dark background", "triangle"),
            row("a red square staying still on a dark background", "square"),
            row("a red circle moving left on a dark background", "circle")]
    summary = summarize(rows)
    assert summary["shape_confusion_asked_to_found"] == {"circle->circle": 1, "square->circle": 1,
                                                         "square->square": 1, "triangle->triangle": 1}
    # the circle prompt is left out: a round blob would pass it whatever the model does with shape
    assert summary["non_circle_shape_right_by_motion"] == {"left": "1/2", "still": "1/1"}
    assert summary["caption_accuracy"] == 0.75
