"""SmolLM2-135M in jaxmoelora against transformers' PyTorch LlamaForCausalLM on the same converted weights (fp32, CPU).

For each system, one subprocess (so that peak memory does not mix) measures, in order:
  - import time (the libraries and transformers' config/model modules), then the load time of `from_pretrained` (the
    model already converted in the cache: the first call after the cache exists), with the peak RSS (`ru_maxrss`)
    right after the load and the RSS before it (imports only). transformers maps the safetensors file and pages the
    weights in during the first forward, so its RSS after load is low; the whole-run peak compares the two fairly;
  - forward tokens/s on a batch of 8 x 256 random tokens: ours jitted (compile time reported apart), torch under
    no_grad; the median of N timed runs after one warm-up run;
  - greedy generation tokens/s at batch 1 and 8: a prompt of 32 tokens, 64 new tokens, no stop at EOS (transformers:
    min_new_tokens=64); new tokens / wall time of the whole call (prefill included); ours after a warm-up call that
    compiles the shape bucket.
The two systems run one after the other, never at once; the table puts each figure next to the other as a ratio.

    python benchmarks/bench_models.py             # 5 forward runs, 3 generation runs
    python benchmarks/bench_models.py --quick     # 2 forward runs, 1 generation run
    python benchmarks/bench_models.py --torch-threads 1
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

MODEL = "smollm2-135m"
PROMPT_TOKENS, NEW_TOKENS = 32, 64


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def random_ids(batch: int, length: int, vocab: int, seed: int):
    import numpy as np
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length)).astype(np.int32)


def timed_median(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----- workers (one subprocess per system) ----------------------------------------------------------------------------

def worker_ours(directory: str, args) -> dict:
    started = time.perf_counter()
    import jax
    import numpy as np
    # from_pretrained reads config.json through AutoConfig, whose first use imports transformers' config modules (and
    # with them torch, when installed: several seconds). Both workers import what they use before the load is timed.
    from flax import nnx
    from transformers import AutoConfig, LlamaConfig  # noqa: F401

    import jaxmoelora
    from jaxmoelora.generation import GenerationConfig, generate_ids_detailed
    jax.devices()
    out = {"import_s": time.perf_counter() - started, "rss_before_load_mb": current_rss_mb()}

    started = time.perf_counter()
    model = jaxmoelora.from_pretrained(directory)
    jax.block_until_ready(nnx.state(model))
    out["load_s"] = time.perf_counter() - started
    out["peak_rss_after_load_mb"] = peak_rss_mb()
    vocab = model.config.vocab_size

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids_bt: nnx.merge(graphdef, state)(ids_bt).logits_btv)
    ids_bt = random_ids(args.batch, args.seq, vocab, 0)
    started = time.perf_counter()
    compiled = forward.lower(state, ids_bt).compile()
    out["forward_compile_s"] = time.perf_counter() - started
    seconds = timed_median(lambda: compiled(state, ids_bt).block_until_ready(), args.forward_runs)
    out["forward_tokens_per_s"] = args.batch * args.seq / seconds

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    for batch in (1, 8):
        prompt_bt = random_ids(batch, PROMPT_TOKENS, vocab, batch)
        mask_bt = np.ones_like(prompt_bt, bool)
        first = generate_ids_detailed(model, prompt_bt, mask_bt, config, eos_ids=(), pad_id=0)
        out[f"generate_b{batch}_compile_s"] = first.compile_s
        runs = [generate_ids_detailed(model, prompt_bt, mask_bt, config, eos_ids=(), pad_id=0)
                for _ in range(args.generate_runs)]
        assert all(r.tokens_bn.shape == (batch, NEW_TOKENS) and r.compile_s == 0.0 for r in runs)
        out[f"generate_b{batch}_tokens_per_s"] = batch * NEW_TOKENS / statistics.median(r.run_s for r in runs)
    out["peak_rss_end_mb"] = peak_rss_mb()
    return out


def worker_torch(directory: str, args) -> dict:
    started = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM  # noqa: F401  (see worker_ours)
    torch.set_num_threads(args.torch_threads)
    out = {"import_s": time.perf_counter() - started, "rss_before_load_mb": current_rss_mb()}

    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out["load_s"] = time.perf_counter() - started
    out["peak_rss_after_load_mb"] = peak_rss_mb()
    out["attn_implementation"] = model.config._attn_implementation
    vocab = model.config.vocab_size

    ids_bt = torch.tensor(random_ids(args.batch, args.seq, vocab, 0), dtype=torch.long)

    def forward():
        with torch.no_grad():
            model(input_ids=ids_bt)

    out["forward_tokens_per_s"] = args.batch * args.seq / timed_median(forward, args.forward_runs)

    for batch in (1, 8):
        prompt_bt = torch.tensor(random_ids(batch, PROMPT_TOKENS, vocab, batch), dtype=torch.long)

        def generate():
            with torch.no_grad():
                tokens = model.generate(input_ids=prompt_bt, attention_mask=torch.ones_like(prompt_bt),
                                        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                        pad_token_id=model.config.pad_token_id)
            assert tokens.shape == (batch, PROMPT_TOKENS + NEW_TOKENS), tokens.shape

        out[f"generate_b{batch}_tokens_per_s"] = batch * NEW_TOKENS / timed_median(generate, args.generate_runs)
    out["peak_rss_end_mb"] = peak_rss_mb()
    return out


# ----- driver ---------------------------------------------------------------------------------------------------------

def run_worker(system: str, directory: str, argv: list[str]) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", system, "--directory", directory, *argv]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {system} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def markdown(ours: dict, theirs: dict, args) -> str:
    def row(name, key, unit, higher_is_better, fmt="{:.1f}"):
        a, b = ours[key], theirs[key]
        better = "higher is better" if higher_is_better else "lower is better"
        return f"| {name} ({unit}, {better}) | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f} |"

    lines = [
        "| measure | jaxmoelora | transformers (PyTorch) | ours / torch |",
        "| --- | --- | --- | --- |",
        row("load, cache warm", "load_s", "s", False, "{:.2f}"),
        row("peak RSS after load", "peak_rss_after_load_mb", "MB", False, "{:.0f}"),
        row("RSS before load (imports)", "rss_before_load_mb", "MB", False, "{:.0f}"),
        row(f"forward {args.batch} x {args.seq}", "forward_tokens_per_s", "tokens/s", True),
        row(f"greedy generation, batch 1, {NEW_TOKENS} new", "generate_b1_tokens_per_s", "tokens/s", True),
        row(f"greedy generation, batch 8, {NEW_TOKENS} new", "generate_b8_tokens_per_s", "tokens/s", True),
        row("peak RSS, whole run", "peak_rss_end_mb", "MB", False, "{:.0f}"),
    ]
    notes = (f"jaxmoelora compile times (not in the figures above): forward {ours['forward_compile_s']:.1f} s, "
             f"generation batch 1 {ours['generate_b1_compile_s']:.1f} s, batch 8 {ours['generate_b8_compile_s']:.1f} s. "
             f"Import time: ours {ours['import_s']:.1f} s, torch {theirs['import_s']:.1f} s. transformers attention: "
             f"{theirs['attn_implementation']}, torch threads: {args.torch_threads}.")
    return "\n".join(lines) + "\n\n" + notes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 forward runs and 1 generation run per figure")
    parser.add_argument("--forward-runs", type=int, default=None, help="timed forward runs (default 5, quick 2)")
    parser.add_argument("--generate-runs", type=int, default=None, help="timed generation runs (default 3, quick 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    parser.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.forward_runs = args.forward_runs or (2 if args.quick else 5)
    args.generate_runs = args.generate_runs or (1 if args.quick else 3)

    if args.worker:
        result = (worker_ours if args.worker == "ours" else worker_torch)(args.directory, args)
        print(json.dumps(result))
        return

    from jaxmoelora.loading.pretrained import resolve
    directory = str(resolve(MODEL))  # downloads and converts on the very first use; cached after
    passed = [f"--forward-runs={args.forward_runs}", f"--generate-runs={args.generate_runs}",
              f"--batch={args.batch}", f"--seq={args.seq}", f"--torch-threads={args.torch_threads}"]
    ours = run_worker("ours", directory, passed)
    theirs = run_worker("torch", directory, passed)
    load = os.getloadavg()
    print(f"SmolLM2-135M-Instruct fp32, {datetime.date.today()}, {os.cpu_count()} cores ({cpu_model()}), no "
          f"accelerator, load average {load[0]:.1f} at the end; forward median of {args.forward_runs}, generation "
          f"median of {args.generate_runs}\n")
    print(markdown(ours, theirs, args))
    if args.json:
        print(json.dumps({"ours": ours, "torch": theirs}, indent=2))


if __name__ == "__main__":
    main()
