"""The safety nets on the loss (image/alpaca_train/guards.py; docs/contract.md, "Diverging
loss"): a non-finite loss stops training with exit 67 and saves nothing over the last good
checkpoint; a loss spike ends the attempt with exit 68, and the next attempt resumes from
the checkpoint before it and skips its steps. Real CPU runs of the tiny model against the
local S3, and the decision itself, pure."""
from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest

from fixtures_train import keys, python, run_cmd, trainer_state

from alpaca_operator.backends.base import EXIT_LOSS_NOT_FINITE, EXIT_LOSS_SPIKE, SKIP_STEPS_ENV, parse_loss_failure
from alpaca_train import exitcodes, guards, progress
from alpaca_train.exitcodes import UsageError
from alpaca_train.guards import NOT_FINITE, SPIKE, FromStep, LossMonitor, ScaleLoss, StepRanges, Trip


# --- the decision, pure -----------------------------------------------------------------

def feed(monitor: LossMonitor, losses: list[float], start: int = 1) -> Trip | None:
    for step, loss in enumerate(losses, start):
        if (trip := monitor.observe(step, loss)) is not None:
            return trip
    return None


def test_a_non_finite_loss_stops_after_the_tolerance_and_a_finite_one_resets_the_count():
    nan, inf = float("nan"), float("inf")
    assert feed(LossMonitor(3), [2.0, nan, nan, 1.9, nan, inf, 1.8]) is None   # never 3 running
    trip = feed(LossMonitor(3), [2.0, 1.9, nan, inf, nan, nan])
    assert (trip.kind, trip.first, trip.last) == (NOT_FINITE, 3, 5)
    assert feed(LossMonitor(1), [2.0, -inf]) == Trip(NOT_FINITE, 2, 2, -inf)


def test_a_spike_is_three_steps_above_factor_times_the_median_of_the_window():
    base = [3.0, 2.0, 2.2, 1.8, 2.1]     # median of the last 4 before step 6: 2.05
    assert feed(LossMonitor(3, spike_factor=2.0, spike_window=4), base + [5.0, 5.0, 4.0, 5.0]) is None   # a blip
    trip = feed(LossMonitor(3, spike_factor=2.0, spike_window=4), base + [5.0, 6.0, 7.0])
    assert (trip.kind, trip.first, trip.last) == (SPIKE, 6, 8) and trip.threshold == pytest.approx(4.1)
    # Not judged before the window is full, and never without a factor.
    assert feed(LossMonitor(3, spike_factor=2.0, spike_window=4), [1.0, 9.0, 9.0, 9.0]) is None
    assert feed(LossMonitor(3), base + [500.0] * 5) is None
    # A blip's losses do not enter the baseline: the next spike is measured as before.
    trip = feed(LossMonitor(3, spike_factor=2.0, spike_window=4), base + [5.0, 5.0, 2.0, 5.0, 5.0, 5.0])
    assert (trip.first, trip.last) == (9, 11) and trip.threshold == pytest.approx(4.1)


def test_step_ranges_and_the_test_hook_parse_and_refuse():
    skip = StepRanges.parse(" 20-22,7-9,5")
    assert str(skip) == "5-5,7-9,20-22" and 8 in skip and 6 not in skip and 23 not in skip
    assert not StepRanges.parse("") and str(skip.plus(30, 31)) == "5-5,7-9,20-22,30-31"
    for bad in ("9-7", "0-2", "x", "3-"):
        with pytest.raises(UsageError, match=SKIP_STEPS_ENV):
            StepRanges.parse(bad)
    assert ScaleLoss.parse("7-9:100") == ScaleLoss(7, 9, 100.0) and math.isnan(ScaleLoss.parse("4:nan").factor_at(4))
    assert ScaleLoss.parse("4:inf").factor_at(5) is None
    with pytest.raises(UsageError, match="STEP:FACTOR"):
        ScaleLoss.parse("7")
    # Once step 7 went wrong, no checkpoint from 7 on, nor one inside a skipped range.
    assert [s for s in (4, 5, 6, 7, 8) if s in FromStep(7, StepRanges.parse("5-5"))] == [5, 7, 8]
    with pytest.raises(UsageError, match="nan_tolerance"):
        LossMonitor(0)


def test_the_verdict_line_is_what_the_operator_parses():
    skip = StepRanges.parse("3-4")
    nan = guards.failure(Trip(NOT_FINITE, 12, 14, math.nan), 10, "s3://b/run/", skip)
    spike = guards.failure(Trip(SPIKE, 21, 23, 40.0, 8.0), None, "s3://b/run/", skip)
    assert nan.exit_code == EXIT_LOSS_NOT_FINITE == exitcodes.LOSS_NOT_FINITE
    assert spike.exit_code == EXIT_LOSS_SPIKE == exitcodes.LOSS_SPIKE
    assert SKIP_STEPS_ENV == guards.SKIP_STEPS_ENV
    got = parse_loss_failure(str(nan), EXIT_LOSS_NOT_FINITE)
    assert (got.kind, got.first, got.last, got.checkpoint) == ("not-finite", 12, 14, 10)
    assert "checkpoint-10 in s3://b/run/" in str(nan) and "lower learning rate" in str(nan)
    got = parse_loss_failure(str(spike), EXIT_LOSS_SPIKE)
    assert (got.kind, got.steps, got.checkpoint) == ("spike", "21-23", None)
    assert "skips steps 3-4,21-23" in str(spike)
    assert parse_loss_failure(str(spike), 1) is None      # a crash whose log tail holds the line
    # Every rank stops with the spike's code; a permanent code of any rank still wins.
    assert exitcodes.combined(1, {0: 68, 1: 68}, False) == 68
    assert exitcodes.combined(1, {0: 68, 1: 64}, False) == 64 and exitcodes.combined(1, {0: 67}, False) == 67


def test_no_checkpoint_is_saved_at_a_non_finite_step_not_even_one_a_sigterm_asked_for():
    import torch

    guard = guards.LossGuard(LossMonitor(2), skip=StepRanges.parse("6-6"))

    def step(n: int, loss: float | None, save: bool = True) -> SimpleNamespace:
        control = SimpleNamespace(should_save=save, should_training_stop=False)
        guard.on_step_begin(None, None, control)
        if loss is not None:
            guard.add(torch.tensor(loss))
        guard.on_step_end(None, SimpleNamespace(global_step=n), control)
        return control

    assert step(4, 2.0).should_save and not guard.vetoed
    c = step(5, math.nan)
    assert not c.should_save and not c.should_training_stop and guard.vetoed == {5}
    assert step(6, None).should_save            # skipped: nothing to judge, the weights are step 5's
    c = step(7, math.inf, save=False)
    assert c.should_training_stop and guard.trip == Trip(NOT_FINITE, 5, 7, math.inf)
    assert guard.logged_loss()[0] and guard.logged_loss() == (False, None)


def test_a_non_finite_loss_is_reported_as_such():
    assert progress.loss_fields(float("nan")) == {"loss": None, "lossNotFinite": "NaN"}
    assert progress.loss_fields(float("-inf"))["lossNotFinite"] == "-Infinity"
    assert progress.loss_fields(1.5) == {"loss": 1.5, "lossNotFinite": None}
    # The Loss column's 4 significant digits, at any scale.
    assert [progress.loss_fields(x)["loss"] for x in (1.23456789, 12.3456, 0.000123456)] == [1.235, 12.35, 0.0001235]
    assert progress.loss_fields(None) == {}
    sent = []
    reporter = progress.ProgressReporter(sent.append, min_interval_s=0)
    reporter.report(force=True, stage="training", step=3, eta=None, **progress.loss_fields(float("inf")))
    reporter.close()
    body = json.loads(json.dumps(sent[0], allow_nan=False))     # valid JSON: no NaN in it
    assert body["status"]["progress"]["loss"] is None and body["status"]["progress"]["lossNotFinite"] == "Infinity"
    assert "eta" not in body["status"]["progress"]


# --- real runs --------------------------------------------------------------------------

def _train(tiny_model, data, out, uri, *extra) -> list:
    return python("-m", "alpaca_train.train", "--model_name_or_path", tiny_model, "--data_path", data,
                  "--output_dir", out, "--output_uri", uri, "--per_device_train_batch_size", "4",
                  "--logging_steps", "1", *extra)


def _checkpoints(s3, bucket, prefix) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for key in keys(s3, bucket, prefix):
        m = re.match(rf"{prefix}checkpoint-(\d+)/(.+)$", key)
        if m:
            out.setdefault(int(m.group(1)), set()).add(m.group(2))
    return out


def test_a_learning_rate_that_makes_the_loss_nan_stops_with_67_and_saves_nothing_after_the_last_good_checkpoint(
        tiny_model, records_file, train_env, tmp_path, s3, bucket):
    # Warm-up from 0: step 2 trains at 2.5e19, so the loss is NaN from step 3 on (fp32 overflows
    # in the attention). A checkpoint is due every 2 steps: step 4 falls inside the NaN streak.
    failure = tmp_path / "failure"
    env = dict(train_env, **s3.env, ALPACA_FAILURE_FILE=str(failure))
    proc = run_cmd(_train(tiny_model, records_file(48), tmp_path / "out", f"s3://{bucket}/run/",
                          "--max_steps", "10", "--learning_rate", "1e20", "--lr_scheduler_type", "constant_with_warmup",
                          "--warmup_steps", "4", "--save_steps", "2", "--nan_tolerance", "3"), env)
    assert proc.returncode == 67, proc.output[-4000:]
    verdict = parse_loss_failure(failure.read_text(), proc.returncode)
    assert verdict is not None, failure.read_text()
    first_nan = int(re.search(r"the loss is not finite \(nan\) at step (\d+)", proc.output).group(1))
    assert verdict.first == first_nan and verdict.last - first_nan + 1 == 3, failure.read_text()   # 3 steps
    # Nothing written after the last good checkpoint, in S3 or on disk, and no model.
    assert set(_checkpoints(s3, bucket, "run/")) == {verdict.checkpoint} and verdict.checkpoint < first_nan
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == [f"checkpoint-{verdict.checkpoint}"]
    assert "run/manifest.json" not in keys(s3, bucket, "run/")
    assert f"checkpoint-{verdict.checkpoint} in s3://{bucket}/run/" in failure.read_text()
    assert "'loss': 'nan'" in proc.output        # the Trainer's own log shows it too, not an average


def test_a_loss_spike_ends_the_attempt_and_the_next_resumes_before_it_skipping_its_batches(
        tiny_model, records_file, train_env, tmp_path, s3, bucket):
    uri = f"s3://{bucket}/run/"
    data = records_file(48)
    args = ["--max_steps", "12", "--learning_rate", "1e-3", "--save_steps", "4", "--loss_spike_factor", "3",
            "--loss_spike_window", "3", "--test_scale_loss_at_step", "7-9:100"]
    failure = tmp_path / "failure"
    env = dict(train_env, **s3.env, ALPACA_FAILURE_FILE=str(failure))
    first = run_cmd(_train(tiny_model, data, tmp_path / "a1", uri, *args), env)
    assert first.returncode == 68, first.output[-4000:]
    verdict = parse_loss_failure(failure.read_text(), first.returncode)
    # The spike's steps 7-9; checkpoint-8, saved inside it, is not where the next attempt goes.
    assert (verdict.steps, verdict.checkpoint) == ("7-9", 4), failure.read_text()
    assert set(_checkpoints(s3, bucket, "run/")) == {4, 8}
    before = {e["step"]: e for e in trainer_state(tmp_path / "a1" / "checkpoint-8")["log_history"]}

    failure.unlink()
    second = run_cmd(_train(tiny_model, data, tmp_path / "a2", uri, *args), dict(env, ALPACA_SKIP_STEPS="7-9")).ok()
    assert f"resuming from {uri}checkpoint-4" in second.output
    assert f"deleting {uri}checkpoint-8 (saved during a loss spike" in second.output
    history = trainer_state(tmp_path / "a2")["log_history"]
    losses = {e["step"]: e["loss"] for e in history if "loss" in e}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6, 10, 11, 12]     # 7-9 trained nothing...
    assert all(losses[s] < 10 for s in losses)                 # ...so the hook's spike never happened
    # ...and drew the same batches as before: every step saw the tokens it saw the first time.
    tokens = {e["step"]: e["num_input_tokens_seen"] for e in history if "num_input_tokens_seen" in e}
    assert all(tokens[s] == before[s]["num_input_tokens_seen"] for s in (5, 6, 7, 8)), (tokens, before)
    assert "run/manifest.json" in keys(s3, bucket, "run/")
