"""Training throughput of every method on SmolLM2-135M next to transformers + PEFT LoRA in PyTorch (issue 4).

One step = the trainer's jitted step (forward, backward w.r.t. adapters and routers only, AdamW update) on a global
batch of 8 x 256 random tokens, all in the loss, as BASELINES.md measures PyTorch; the demo row runs `configs/demo.yaml`
on one batch of its own gsm_symbolic data (the loss on the answers only, so the head skips the prompt-only chunks).
Each system runs in its own subprocess so peak memory (ru_maxrss) is its own; figures are medians over timed steps
after the first and one untimed warm-up step (the first, with compilation, is reported as time to first step). Also
reported: optimizer-state bytes against trainable-parameter bytes (AdamW: 2x, nothing for the base). Our workers run
with the huge-page malloc tunable, as the `jaxmoelora` command runs itself (jaxmoelora/host_memory.py); PEFT runs both
as torch runs by default and with that tunable.

    python benchmarks/bench_training.py                       # every method + PEFT LoRA, 5 timed steps each
    python benchmarks/bench_training.py --methods loramoe lora --steps 3
    python benchmarks/bench_training.py --methods loramoe --no-demo --repeat 2
    python benchmarks/bench_training.py --methods --no-demo --no-unrolled --remat   # remat policies against PEFT
    python benchmarks/bench_training.py --methods loramoe mixlora --remat-policy save_dots   # each with and without
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from jaxmoelora.host_memory import glibc_version, hugepage_environment, transparent_hugepages_available

METHODS = ("lora", "loramoe", "moelora", "slim", "moral", "mixlora", "hydralora")
# Our LoRA with exactly the PEFT baseline's adapter: rank 32, alpha 64 on gate/up/down, no dropout.
PEFT_MATCHED = "lora-peft-matched"
UNROLLED = "lora-peft-matched-unrolled"  # the same with model.scan_layers=false
# The same with model.remat=true and each remat policy (--remat).
REMAT = {"lora-peft-matched-remat-full": "full", "lora-peft-matched-remat-save-dots": "save_dots"}
# PEFT as it runs by default, and with the huge-page malloc tunable our command line sets for itself.
PEFT_WORKERS = ("peft", "peft-hugepage")
BATCH, SEQ = 8, 256
PEFT_LABEL = "PEFT LoRA r32 gate/up/down (torch)"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def build_jax(method: str, demo: bool = False):
    """(step function that runs one training step and waits for it, facts about the setup) for our `method`;
    `method@policy` runs it with model.remat=true and that remat policy."""
    import jax
    import numpy as np

    import jaxmoelora
    from jaxmoelora.sharding.rules import make_mesh
    from jaxmoelora.training.config import TrainOptions, load_experiment
    from jaxmoelora.training.optimizer import make_optimizer, split_by_labels
    from jaxmoelora.training.step import TrainState, make_train_step

    method, _, method_policy = method.partition("@")
    if demo:
        experiment = load_experiment("configs/demo.yaml")
        adapter, options, batch, seq = experiment.adapter, experiment.train, experiment.data.batch_size, \
            experiment.data.max_length
    elif method in (PEFT_MATCHED, UNROLLED, *REMAT):
        adapter = jaxmoelora.AdapterConfig(method="lora", target_modules=("gate_proj", "up_proj", "down_proj"),
                                           rank=32, alpha=64.0)
        options, batch, seq = TrainOptions(steps=1000), BATCH, SEQ
    else:
        adapter, options, batch, seq = jaxmoelora.preset(method), TrainOptions(steps=1000), BATCH, SEQ
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    model = jaxmoelora.from_pretrained("smollm2-135m", mesh=mesh, adapter=adapter, scan_layers=method != UNROLLED,
                                       remat=method in REMAT or bool(method_policy),
                                       remat_policy=method_policy or REMAT.get(method, "full"))
    graphdef, trainable, adapter_state, frozen = split_by_labels(model)
    tx = make_optimizer(options, trainable)
    opt_state = jax.jit(tx.init)(trainable)
    holder = {"state": TrainState(jax.numpy.zeros((), jax.numpy.int32), trainable, adapter_state, opt_state,
                                  jax.random.key_data(jax.random.key(0)))}
    step_fn = jax.jit(make_train_step(graphdef, tx, options), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, (batch, seq + 1)).astype(np.int32)
    batch_arrays = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq), np.int32),
                    "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)),
                    "segment_ids": np.ones((batch, seq), np.int32),
                    "task_type": (np.arange(batch)[:, None] % 2 * np.ones((1, seq))).astype(np.int32)}

    if demo:  # the demo's own data: gsm_symbolic prompts and answers, the loss on the answers only
        from jaxmoelora.data.pipeline import make_dataset
        from jaxmoelora.loading.pretrained import load_tokenizer
        batch_arrays = next(iter(make_dataset(experiment.data, load_tokenizer(experiment.model.path))))

    def step() -> None:
        holder["state"], metrics = step_fn(holder["state"], frozen, batch_arrays)
        jax.block_until_ready(metrics["loss"])

    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    state = holder["state"]
    system = f"jaxmoelora demo ({batch} x {seq})" if demo else f"jaxmoelora {method}"
    facts = {"system": system + (f", remat_policy={method_policy}" if method_policy else ""),
             "trainable": sum(x.size for x in jax.tree.leaves(state.trainable)), "tokens": batch * seq,
             "optimizer_bytes_over_trainable": nbytes(state.opt_state) / nbytes(state.trainable),
             "loss_token_share": float(np.mean(batch_arrays["loss_mask"])),
             "frozen_bytes": nbytes(frozen)}
    return step, facts


def build_peft(label: str):
    """(step function, facts) for transformers + PEFT LoRA r32 alpha 64 on gate/up/down with AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jaxmoelora.loading.pretrained import resolve

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(resolve("smollm2-135m")), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=["gate_proj", "up_proj",
                                                                                  "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, 49152, (BATCH, SEQ + 1))

    def step() -> None:
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return step, {"system": label, "trainable": trainable, "tokens": BATCH * SEQ,
                  "optimizer_bytes_over_trainable": 2.0, "frozen_bytes": None}


WARMUP_STEPS = 1  # untimed steps after the first: the step after compilation still runs slow (memory warm-up)


def timed_steps(step, steps: int) -> list[float]:
    """The first step's time (with compilation), then `steps` timed steps after WARMUP_STEPS untimed ones."""
    def timed() -> float:
        started = time.perf_counter()
        step()
        return time.perf_counter() - started

    times = [timed()]
    for _ in range(WARMUP_STEPS):
        step()
    times += [timed() for _ in range(steps)]
    return times


def run_worker(worker: str, steps: int) -> dict:
    if worker in PEFT_WORKERS:
        step, facts = build_peft(PEFT_LABEL + (", hugepage malloc" if worker == "peft-hugepage" else ""))
    else:
        step, facts = build_jax(worker, worker == "demo")
    times = timed_steps(step, steps)
    median = statistics.median(times[1:])
    return facts | {"tokens_per_s": facts["tokens"] / median, "step_s": median, "first_step_s": times[0],
                    "peak_rss_gb": peak_rss_gb()}


def cpu_name() -> str:
    return next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--no-demo", action="store_true")
    parser.add_argument("--no-unrolled", action="store_true", help="skip the scan_layers=false row")
    parser.add_argument("--remat", action="store_true", help="add our PEFT-matched LoRA with each remat policy")
    parser.add_argument("--remat-policy", choices=("full", "save_dots"),
                        help="also run each of --methods with model.remat=true and this policy, next to it")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole list of workers this many times in turn (the machine's speed drifts); "
                             "each system's tokens/s is then the median over the repeats, with their range")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args.worker, args.steps)), flush=True)
        return
    workers = (([] if args.no_peft else [*PEFT_WORKERS, PEFT_MATCHED]) + ([] if args.no_unrolled else [UNROLLED])
               + (list(REMAT) if args.remat else [])
               + [w for m in args.methods for w in ([m, f"{m}@{args.remat_policy}"] if args.remat_policy else [m])]
               + ([] if args.no_demo else ["demo"]))
    runs: dict[str, list[dict]] = {}
    for worker in workers * args.repeat:
        # Our workers run as the `jaxmoelora` command runs itself (jaxmoelora/host_memory.py); "peft" as torch runs.
        if worker == "peft":
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        else:
            env = hugepage_environment(os.environ, glibc=glibc_version(),
                                       hugepages_available=transparent_hugepages_available()) or dict(os.environ)
        out = subprocess.run([sys.executable, __file__, "--worker", worker, "--steps", str(args.steps)],
                             capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"{worker} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        result = json.loads(line[0][7:])
        runs.setdefault(result["system"], []).append(result)
        print(f"done: {result['system']}: {result['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    results = []
    for system_runs in runs.values():
        rates = [r["tokens_per_s"] for r in system_runs]
        results.append(system_runs[0] | {"tokens_per_s": statistics.median(rates), "range": (min(rates), max(rates)),
                                         "first_step_s": statistics.median(r["first_step_s"] for r in system_runs),
                                         "peak_rss_gb": max(r["peak_rss_gb"] for r in system_runs)})
    peft = next((r for r in results if r["system"] == PEFT_LABEL), None)
    peft_runs = runs.get(PEFT_LABEL, [])
    for r in results:  # the median over rounds of each round's ratio to PEFT: the slow drift moves whole rounds
        pairs = zip(runs[r["system"]], peft_runs)
        r["vs_peft_by_round"] = statistics.median([a["tokens_per_s"] / p["tokens_per_s"] for a, p in pairs] or [0])
    print(f"# {datetime.date.today()} {platform.node()} {cpu_name()}, jax {__import__('jax').__version__}, "
          f"batch {BATCH} x {SEQ} (demo: its own config), {args.steps} timed steps, {args.repeat} repeat(s)")
    print("| system | trainable | tokens/s (range over repeats) | vs PEFT LoRA (of medians; by round) | first step (s) "
          "| peak RSS (GB) | optimizer / trainable bytes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = f"{r['tokens_per_s'] / peft['tokens_per_s']:.2f}x; {r['vs_peft_by_round']:.2f}x" if peft else "-"
        low, high = r["range"]
        print(f"| {r['system']} | {r['trainable'] / 1e6:.2f} M | {r['tokens_per_s']:.0f} ({low:.0f}-{high:.0f}) | "
              f"{ratio} | "
              f"{r['first_step_s']:.1f} | {r['peak_rss_gb']:.1f} | {r['optimizer_bytes_over_trainable']:.2f} |")


if __name__ == "__main__":
    main()
