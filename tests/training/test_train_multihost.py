"""Two local processes with 4 CPU devices each (jax.distributed from the JAX_* environment, gloo collectives) train the
8-device mesh, checkpoint, stop after 5 steps, resume, and match the single-process 8-device run; only process 0
prints and writes the shared files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from training_helpers import DRIVER, EIGHT_DEVICE_MESH, USER_LOGGING, driver_results, free_port, subprocess_env

TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def run_two_processes(job: dict, printed_dir: Path) -> list[subprocess.CompletedProcess]:
    """Each process's Python output (not gloo's notices) goes to printed_dir/process_{pid}.txt. Both processes compile their programs (no compilation cache): gloo gives a process 30 s to join the first
    collective, so one process loading the step from a cache while the other compiles it could time out."""
    port = free_port()
    processes = []
    for pid in range(2):
        env = subprocess_env(None, devices=4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                             JAX_PROCESS_ID=str(pid), DRIVER_PYTHON_STDOUT=str(printed_dir / f"process_{pid}.txt"))
        processes.append(subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(job)], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=env))
    done = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=600)
            done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for pid, d in enumerate(done):
        assert d.returncode == 0, f"process {pid} failed:\n{d.stderr[-5000:]}"
    return done


def printed_lines(path: Path) -> list[str]:
    """What the trainer printed through Python in one process."""
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_two_processes_train_checkpoint_resume_and_match_one_process(runs, tmp_path):
    eight = runs.eight_devices()["scratch"]
    one = runs.reference("loramoe")
    overrides = runs.overrides("loramoe", tmp_path, *EIGHT_DEVICE_MESH, *USER_LOGGING, "log.progress=true")

    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = run_two_processes({"overrides": overrides, "stop_after": 5, "quiet": False}, tmp_path / "first")
    assert [driver_results(d.stdout)[-1]["stop_reason"] for d in first] == ["stop_after"] * 2
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 5]
    assert (tmp_path / "checkpoints" / "5" / "data" / "process_1-of-2.json").is_file()  # each process's data position

    second = run_two_processes({"overrides": overrides, "quiet": False}, tmp_path / "second")
    assert [driver_results(d.stdout)[-1]["stop_reason"] for d in second] == ["completed"] * 2

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))  # one writer: no step twice
    losses = [r["loss"] for r in records]
    np.testing.assert_allclose(losses, eight["losses"], **TOLERANCE)
    np.testing.assert_allclose(losses, one.losses, **TOLERANCE)
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "expert_load.png").is_file()

    for run, (main, other) in (("first", first), ("second", second)):
        printed = "\n".join(printed_lines(tmp_path / run / "process_0.txt"))
        assert "resolved config" in printed and "finished at step" in printed
        assert "%|" in main.stderr  # process 0's progress bar
        assert printed_lines(tmp_path / run / "process_1.txt") == []
        assert "%|" not in other.stderr and "finished at step" not in other.stderr
    assert "resumed from" in "\n".join(printed_lines(tmp_path / "second" / "process_0.txt"))
