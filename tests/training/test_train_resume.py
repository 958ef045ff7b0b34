"""A stopped run resumes from its checkpoint and continues exactly as if it had never stopped: the same losses, bit
for bit, and the same final train state (on CPU, where the programs are deterministic)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from training_helpers import assert_same_arrays, losses, read_checkpoint_arrays, subprocess_env

from jaxmoelora.training.checkpointing import AdapterCheckpointer
from jaxmoelora.training.config import CheckpointOptions, load_experiment
from jaxmoelora.training.trainer import train

# slim carries non-trainable adapter state (cluster centres) and re-samples its merging masks every step; the
# accumulation variant scans micro-batches, the padded variant reads one example per row.
CASES = [("loramoe",), ("slim",), ("loramoe", "train.grad_accum_steps=2"), ("slim", "data.pack=false")]


def saved_steps(output_dir) -> list[int]:
    return AdapterCheckpointer(output_dir / "checkpoints", CheckpointOptions()).all_steps()


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_run_stopped_after_5_steps_resumes_with_identical_losses(runs, tmp_path, case):
    method, *extra = case
    reference = runs.reference(method, *extra)
    config = load_experiment(None, runs.overrides(method, tmp_path, *extra))

    stopped = train(config, stop_after=5, quiet=True)
    assert (stopped.step, stopped.stop_reason) == (5, "stop_after")
    assert saved_steps(tmp_path) == [3, 5]
    assert losses(stopped.history) == reference.losses[:5]

    resumed = train(config, quiet=True)
    assert (resumed.step, resumed.stop_reason) == (12, "completed")
    assert losses(resumed.history) == reference.losses
    assert_same_arrays(read_checkpoint_arrays(tmp_path / "checkpoints", 12),
                       read_checkpoint_arrays(reference.checkpoints, 12))


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes_identically(runs, tmp_path, monkeypatch):
    """SIGINT (Ctrl-C) during step 4 finishes that step, saves it, and returns; the rerun continues from it."""
    from jaxmoelora.training import metrics

    reference = runs.reference("loramoe")
    config = load_experiment(None, runs.overrides("loramoe", tmp_path))
    log = metrics.MetricsLogger.log

    def log_then_interrupt(self, step, values, seconds):
        record = log(self, step, values, seconds)
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(metrics.MetricsLogger, "log", log_then_interrupt)
    interrupted = train(config, quiet=True)
    assert (interrupted.step, interrupted.stop_reason) == (4, "interrupted")
    assert saved_steps(tmp_path) == [3, 4]
    monkeypatch.undo()

    resumed = train(config, quiet=True)
    assert losses(resumed.history) == reference.losses


def test_sigterm_to_the_cli_saves_exits_cleanly_and_resumes_identically(runs, tmp_path, compilation_cache):
    """`jaxmoelora train` (asynchronous checkpoints) gets SIGTERM after its first metric line: it exits with status
    0, has a checkpoint of the step it stopped at, and a rerun completes with the uninterrupted run's losses."""
    reference = runs.reference("loramoe")
    overrides = runs.overrides("loramoe", tmp_path, "checkpoint.async_save=true")
    metrics_file = tmp_path / "metrics.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "jaxmoelora.cli", "train", *overrides], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=subprocess_env(compilation_cache))
    try:
        deadline = time.monotonic() + 300
        while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 1):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no metrics after 300 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    stopped_at = json.loads(metrics_file.read_text().splitlines()[-1])["step"]
    assert stopped_at < 12, "the run finished before the signal arrived; nothing was tested"
    assert f"received signal {int(signal.SIGTERM)}: saving a checkpoint at step {stopped_at}" in stdout
    assert f"finished at step {stopped_at} (interrupted)" in stdout
    assert saved_steps(tmp_path)[-1] == stopped_at

    resumed = train(load_experiment(None, overrides), quiet=True)
    assert resumed.stop_reason == "completed"
    assert losses(resumed.history) == reference.losses
    assert_same_arrays(read_checkpoint_arrays(tmp_path / "checkpoints", 12),
                       read_checkpoint_arrays(reference.checkpoints, 12))
