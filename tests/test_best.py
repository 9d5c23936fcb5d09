"""--select_best and --early_stop: the checkpoint with the best dev score is kept, test-scored and
exported; early stopping ends the run; a resumed run keeps the best so far."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import EVALUATE_PY, ORI_JSON, REPO, check_ok, launch, read_scalars, stopped_at, tiny_args
from medgpt.safe_load import load_weights

pytestmark = pytest.mark.e2e

STEPS, EVERY = 12, 2
# lr 2e-2 without warmup: the tiny model's dev macro-F1 climbs to a plateau mid-run (it settles on
# one answer), and ties keep the earlier step, so the best checkpoint is not the last one.
# ZeRO-1: its checkpoints are partitioned (a resize reshards them), its model states file holds the
# whole model (module_weights).
BEST = dict(max_steps=STEPS, lr=2e-2, warmup_steps=0, eval_every=EVERY, save_every=EVERY, select_best="macro_f1",
            seq_len=256, micro_batch_size=4, grad_accum=1, eval_batch_size=32,
            ds_config=REPO / "ds_configs" / "zero1.json")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """12 steps, dev scored and a checkpoint saved every 2, all checkpoints kept."""
    out = tmp_path_factory.mktemp("best-reference")
    check_ok(launch(tiny_args(out, data_cache, keep_last=0, **BEST)))
    return out


def dev_scores(out):
    return [(step, value) for step, value in read_scalars(out)["eval/macro_f1"]]


def expected_best(scores, early_stop=0):
    """The --select_best rule, written out: the first step of the highest score, and where
    --early_stop ends the run (None: it does not)."""
    best, best_step, since = None, 0, 0
    for step, score in scores:
        if best is None or score > best:
            best, best_step, since = score, step, 0
        else:
            since += 1
            if early_stop and since >= early_stop:
                return best_step, step
    return best_step, None


def module_weights(tag_dir):
    return load_weights(tag_dir / "mp_rank_00_model_states.pt")["module"]


def exported_weights(out):
    return AutoModelForCausalLM.from_pretrained(out / "export").state_dict()


def test_the_best_dev_step_is_kept_scored_and_exported(reference, tmp_path):
    scores = dev_scores(reference)
    assert [step for step, _ in scores] == list(range(EVERY, STEPS + 1, EVERY))
    best_step, _ = expected_best(scores)
    assert best_step < STEPS, f"the dev score peaked at the last step ({scores}): nothing to select"
    best = json.loads((reference / "best.json").read_text())
    assert (best["metric"], best["step"]) == ("macro_f1", best_step)
    assert best["score"] == pytest.approx(dict(scores)[best_step], rel=1e-6)  # TensorBoard keeps float32
    assert read_scalars(reference)["best/step"][-1] == (best_step, best_step)

    exported = exported_weights(reference)
    chosen, last = (module_weights(reference / "checkpoints" / f"step{s}") for s in (best_step, STEPS))
    assert all(torch.equal(exported[name], value) for name, value in chosen.items())
    assert any(not torch.equal(exported[name], value) for name, value in last.items())
    # The test predictions are the best weights' own: the export scored on its own agrees.
    check_ok(launch(["--model", str(reference / "export"), "--data", str(ORI_JSON), "--seq_len", "256",
                     "--output_dir", str(tmp_path / "scored")], script=EVALUATE_PY))
    assert (json.loads((tmp_path / "scored" / "predictions.json").read_text())
            == json.loads((reference / "test_predictions.json").read_text()))


def test_early_stop_ends_the_run_and_keeps_the_best(reference, tmp_path, data_cache):
    best_step, stop_step = expected_best(dev_scores(reference), early_stop=2)
    assert stop_step is not None and stop_step < STEPS, "the reference never went 2 evaluations without gain"
    out = tmp_path / "early"
    proc = launch(tiny_args(out, data_cache, keep_last=1, early_stop=2, **BEST))
    check_ok(proc)
    assert "early stop" in proc.stdout
    assert read_scalars(out)["train/loss"][-1][0] == stop_step
    assert dev_scores(out) == [(s, v) for s, v in dev_scores(reference) if s <= stop_step]
    assert json.loads((out / "best.json").read_text())["step"] == best_step
    # keep_last 1 keeps the last checkpoint, and the best one besides.
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == sorted(
        {f"step{best_step}", f"step{stop_step}"})
    assert (out / "export" / "config.json").is_file()
    again = launch(tiny_args(out, data_cache, keep_last=1, early_stop=2, **BEST))
    check_ok(again)
    assert f"already stopped early at step {stop_step}" in again.stdout


def test_a_resumed_run_keeps_the_best_so_far(reference, tmp_path, data_cache):
    best_step, _ = expected_best(dev_scores(reference))
    stop = best_step + EVERY  # a checkpoint after the best: the best lives in its train state
    resumed = stopped_at(reference, tmp_path / "resumed", stop, older=(best_step,))
    check_ok(launch(tiny_args(resumed, data_cache, keep_last=0, **BEST)))
    assert json.loads((resumed / "best.json").read_text())["step"] == best_step
    want, got = exported_weights(reference), exported_weights(resumed)
    assert all(torch.equal(got[name], value) for name, value in want.items())
    assert (resumed / "test_predictions.json").read_text() == (reference / "test_predictions.json").read_text()


def test_a_best_saved_before_a_resize_loads_after_any_later_resume(reference, tmp_path, data_cache):
    """The best saved on 1 rank; the run goes on and finishes on 2 ranks (its resume resharded), then
    is rerun longer on 2 ranks: that resume needs no resharding, the best it ends with still does."""
    best_step, _ = expected_best(dev_scores(reference))
    assert best_step + EVERY < STEPS, f"the best step {best_step} leaves no room for two more resumes"
    run = stopped_at(reference, tmp_path / "resized", best_step)
    two_ranks = {**BEST, "micro_batch_size": BEST["micro_batch_size"] // 2}  # the same global batch
    for max_steps in (best_step + EVERY, STEPS):
        check_ok(launch(tiny_args(run, data_cache, keep_last=0, **{**two_ranks, "max_steps": max_steps}),
                        launcher="torchrun", nproc=2))
        assert json.loads((run / "best.json").read_text())["step"] == best_step
        assert (run / "checkpoints" / f"step{best_step}_universal").is_dir()
        got, want = exported_weights(run), exported_weights(reference)
        assert all(torch.equal(got[name], value) for name, value in want.items())
