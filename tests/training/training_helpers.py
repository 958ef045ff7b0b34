"""Helpers for the training tests: a tiny random Llama with a byte-level tokenizer and ChatML template, small JSONL
datasets (all made here, no downloads), training runs shared by a session, subprocess runs and checkpoint reading.

Compilation dominates these tests on a 2-core CPU, so they run (conftest.py) with
- a persistent compilation cache shared by the session and its subprocesses: a run that repeats an earlier program
  (a resumed run, a run in a subprocess) loads the compiled executable instead of compiling it again;
- the classic threefry PRNG and XLA's optimisation passes off (as in tests/adapters), which change how fast programs
  compile, not what the tests check: every comparison is between runs made with the same settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from tiny_checkpoint import write_tiny_llama

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_chat_model(directory: Path, *, layers: int = 2, hidden: int = 32, intermediate: int | None = None,
                          seed: int = 0) -> Path:
    """config.json + model.safetensors (random, HF layout) + a byte-level BPE tokenizer with a ChatML template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", additional_special_tokens=SPECIALS)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)

    return write_tiny_llama(directory, seed=seed, scale=0.2, vocab_size=288, hidden_size=hidden,
                            intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                            max_position_embeddings=512, tie_word_embeddings=True)


def write_arithmetic_jsonl(path: Path, n: int = 64, seed: int = 0) -> Path:
    """Tiny sums with task types 0/1 alternating (LoRAMoE's two groups)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            a, b = rng.integers(0, 10, 2)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b), "task_type": i % 2}) + "\n")
    return path


def tiny_overrides(model_dir: Path, data: Path, output_dir: Path, method: str = "loramoe", steps: int = 6) -> list[str]:
    """Overrides for a fast run of `method` on the tiny model (rank 2, small batches, no progress bar)."""
    return [f"model.path={model_dir}", f"data.path={data}", f"output_dir={output_dir}", f"adapter.method={method}",
            "adapter.rank=2", f"train.steps={steps}", "train.learning_rate=0.01", "train.warmup_steps=0",
            "data.batch_size=4", "data.max_length=64", "checkpoint.save_every=3", "checkpoint.async_save=false",
            "log.progress=false", "log.tensorboard=false", "log.plots=false"]


# ----------------------------------------------------------------------------------------------------------------------
# Fast, shared compilation

FAST_JAX = {"jax_threefry_partitionable": False, "jax_disable_most_optimizations": True,
            "jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": 0}


def subprocess_env(compilation_cache: Path | None, devices: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a training subprocess: CPU only, `devices` host devices, and the same compile settings as
    the tests (so its programs compute what the tests' do) and their compilation cache (None: no cache)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env |= {f"JAX_{name[4:].upper()}": str(int(v) if isinstance(v, bool) else v) for name, v in FAST_JAX.items()}
    env |= {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    if compilation_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env | extra


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# Training runs in a subprocess: `python -c DRIVER JOB [JOB ...]`, each JOB a JSON object {"name", "overrides",
# "stop_after", "quiet", "record_restore"}, run in order in one process. With record_restore, the train state restored
# from a checkpoint is pickled there (values, partition specs, device counts) for the test to compare. With the
# environment variable DRIVER_PYTHON_STDOUT, what Python code prints goes to that file instead of stdout (native
# libraries such as gloo keep writing to stdout, interleaved at any point).
DRIVER = """
import json, os, pickle, sys
if os.environ.get("DRIVER_PYTHON_STDOUT"):
    sys.stdout = open(os.environ["DRIVER_PYTHON_STDOUT"], "w", buffering=1)
import jax, numpy as np
from jaxmoelora.training import checkpointing
from jaxmoelora.training.config import load_experiment
from jaxmoelora.training.trainer import train

restore = checkpointing.AdapterCheckpointer.restore

def recording_restore(path):
    def restore_and_record(self, step, abstract_state, data_iterator):
        state, config = restore(self, step, abstract_state, data_iterator)
        name = lambda p: "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p)
        record = {name(p): (np.asarray(jax.device_get(x)), tuple(x.sharding.spec), len(x.sharding.device_set))
                  for p, x in jax.tree_util.tree_leaves_with_path(state)}
        with open(path, "wb") as f:
            pickle.dump({"step": step, "leaves": record}, f)
        return state, config
    return restore_and_record

for job in map(json.loads, sys.argv[1:]):
    checkpointing.AdapterCheckpointer.restore = (recording_restore(job["record_restore"])
                                                 if job.get("record_restore") else restore)
    result = train(load_experiment(None, job["overrides"]), stop_after=job.get("stop_after"),
                   quiet=job.get("quiet", True))
    print("RESULT " + json.dumps({"name": job.get("name"), "step": result.step, "stop_reason": result.stop_reason,
                                  "losses": [h["loss"] for h in result.history]}), file=sys.__stdout__, flush=True)
"""


def run_driver(jobs: list[dict], env: dict[str, str], timeout: float = 600) -> dict[str, dict]:
    """Runs the jobs in one subprocess; their results by name."""
    done = subprocess.run([sys.executable, "-c", DRIVER, *map(json.dumps, jobs)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-5000:]
    return {r["name"]: r for r in driver_results(done.stdout)}


def driver_results(stdout: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]


# ----------------------------------------------------------------------------------------------------------------------
# Runs shared by the session

REFERENCE_STEPS = 12


def run_overrides(model_dir: Path, data: Path, output_dir: Path, method: str, *extra: str) -> list[str]:
    """The shared runs' settings: `tiny_overrides` for 12 steps (checkpoints at 3, 6, 9, 12; the newest 3 kept)."""
    return [*tiny_overrides(model_dir, data, output_dir, method, steps=REFERENCE_STEPS), *extra]


# The reference runs also write TensorBoard events and plots, as a user's run does (it changes no computation).
USER_LOGGING = ("log.tensorboard=true", "log.plots=true")


def losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history]


@dataclasses.dataclass
class Run:
    config: object  # ExperimentConfig
    result: object  # TrainResult
    output_dir: Path

    @property
    def losses(self) -> list[float]:
        return losses(self.result.history)

    @property
    def checkpoints(self) -> Path:
        return self.output_dir / "checkpoints"


class SharedRuns:
    """Training runs made once per session on first use (so they compile under the tests' settings) and read by
    several tests: the uninterrupted 1-device run of each method and variant, and the 8-device loramoe runs."""

    def __init__(self, root: Path, model_dir: Path, data: Path, compilation_cache: Path):
        self.root, self.model_dir, self.data, self.cache = root, model_dir, data, compilation_cache
        self._runs: dict[tuple, Run] = {}
        self._eight: dict | None = None

    def overrides(self, method: str, output_dir: Path, *extra: str) -> list[str]:
        return run_overrides(self.model_dir, self.data, output_dir, method, *extra)

    def reference(self, method: str, *extra: str) -> Run:
        """The uninterrupted run of `method` with `extra` overrides."""
        key = (method, *extra)
        if key not in self._runs:
            from jaxmoelora.training.config import load_experiment
            from jaxmoelora.training.trainer import train

            name = f"{method}-" + hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]
            config = load_experiment(None, self.overrides(method, self.root / name, *USER_LOGGING, *extra))
            result = train(config, quiet=True)
            assert result.stop_reason == "completed" and result.step == REFERENCE_STEPS, result
            self._runs[key] = Run(config, result, self.root / name)
        return self._runs[key]

    def eight_devices(self) -> dict:
        """One subprocess with 8 CPU devices and the mesh {data: 2, expert: 2, tensor: 2}: loramoe trained from
        scratch ("scratch") and resumed from the 1-device run's step-6 checkpoint ("resumed", with the restored state
        in "restored")."""
        if self._eight is None:
            import pickle

            one = self.reference("loramoe")
            resumed_dir = self.root / "loramoe-8dev-resumed"
            shutil.copytree(one.output_dir, resumed_dir)
            for step_dir in (resumed_dir / "checkpoints").iterdir():
                if step_dir.name.isdigit() and int(step_dir.name) > 6:
                    shutil.rmtree(step_dir)
            record = self.root / "restored.pkl"
            jobs = [{"name": "scratch", "overrides": self.overrides("loramoe", self.root / "loramoe-8dev",
                                                                    *EIGHT_DEVICE_MESH)},
                    {"name": "resumed", "overrides": self.overrides("loramoe", resumed_dir, *EIGHT_DEVICE_MESH),
                     "record_restore": str(record)}]
            self._eight = run_driver(jobs, subprocess_env(self.cache, devices=8))
            self._eight["scratch"]["output_dir"] = self.root / "loramoe-8dev"
            with open(record, "rb") as f:
                self._eight["restored"] = pickle.load(f)
        return self._eight


EIGHT_DEVICE_MESH = ("mesh.data=2", "mesh.expert=2", "mesh.tensor=2")


def read_checkpoint_arrays(checkpoints: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpoint's train state as numpy, by its tree path (read without a target mesh)."""
    import jax
    import orbax.checkpoint as ocp

    path = Path(checkpoints) / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(restored)}


def path_name(path) -> str:
    """A tree path as `trainable/layers/mlp/gate_proj/experts/lora_a/value`, whatever the containers."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} arrays differ, e.g. {different[:3]}"
