"""The `jaxmoelora` command: `jaxmoelora generate ...`, `jaxmoelora convert ...` and the subcommands other modules add.

A subcommand is a function `add_parser(subparsers)` that adds its parser and sets `run=<function(args) -> int | None>`
as a default; `SUBCOMMANDS` lists them as "module:function" and they are imported when the parser is built. To add
`train` or `export`, write its `add_parser` next to the code it drives and append it here. Keep heavy imports (jax,
transformers) inside `run`, so `jaxmoelora --help` stays fast.

User errors (`JaxMoeLoraError`: a missing file, a bad value) print `error: <message>` and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jaxmoelora.errors import CheckpointError, JaxMoeLoraError
from jaxmoelora.host_memory import restart_with_hugepage_malloc

SUBCOMMANDS: list[str] = [
    "jaxmoelora.cli:add_generate_parser",
    "jaxmoelora.cli:add_convert_parser",
    "jaxmoelora.training.cli:add_train_parser",
    "jaxmoelora.export.cli:add_export_peft_parser",
]
USER_ERROR_STATUS = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxmoelora", description="Mixture-of-LoRA-experts fine-tuning for Llama-family models in JAX.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for spec in SUBCOMMANDS:
        module_name, _, function_name = spec.partition(":")
        getattr(importlib.import_module(module_name), function_name)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns its exit status (argparse exits with 2 itself on malformed arguments)."""
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
    except JaxMoeLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_STATUS
    return 0 if status is None else int(status)


def run_command() -> None:
    """The `jaxmoelora` console command (and train.py): `main` on sys.argv, with huge-page malloc on Linux."""
    restart_with_hugepage_malloc()
    sys.exit(main())


def check_model_argument(model: str) -> None:
    """A model argument is a directory, a .gguf file or a known name; fail early on a path that does not exist."""
    path = Path(model).expanduser()
    looks_like_path = "/" in model or "\\" in model or model.startswith(".") or path.suffix == ".gguf"
    if looks_like_path and not path.exists():
        raise CheckpointError(f"model path {model} does not exist; pass a Hugging Face model directory, a .gguf file "
                              "or a known model name such as smollm2-135m")


# ----------------------------------------------------------------------------------------------------------------------
# generate

def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="continue prompts with a model",
                              description="Continue one or more prompts (batched) and print each continuation.")
    p.add_argument("--model", required=True,
                   help="Hugging Face model directory, .gguf file, or a known name (smollm2-135m)")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt; repeat --prompt to generate for several prompts in one batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 keeps every token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute and weight dtype (default: float32)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="tokenize prompts as they are, even if the tokenizer has a chat template")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from jaxmoelora.generation import GenerationConfig, generate_detailed
    from jaxmoelora.loading.pretrained import from_pretrained, load_tokenizer, resolve

    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    check_model_argument(args.model)
    start = time.perf_counter()
    directory = resolve(args.model)
    model = from_pretrained(directory, dtype=args.dtype)
    tokenizer = load_tokenizer(directory)
    load_s = time.perf_counter() - start
    result = generate_detailed(model, tokenizer, args.prompt, config,
                               chat_template=False if args.no_chat_template else None)
    for i, (prompt, text) in enumerate(zip(args.prompt, result.texts), start=1):
        reason, n = result.finish_reasons[i - 1], int(result.num_tokens_b[i - 1])
        print(f"=== prompt {i} ===\n{prompt}\n=== completion {i} ({n} tokens, stopped at {reason}) ===\n{text}\n")
    total = int(result.num_tokens_b.sum())
    print(f"{args.model}: loaded in {load_s:.1f} s, compiled in {result.compile_s:.1f} s; "
          f"{total} new tokens for {len(args.prompt)} prompt(s) in {result.run_s:.2f} s "
          f"({result.tokens_per_s:.1f} tokens/s)", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# convert

def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a GGUF checkpoint to a Hugging Face directory",
                              description="Write a Hugging Face model directory (safetensors, config, tokenizer) "
                                          "for a llama.cpp GGUF file.")
    p.add_argument("gguf_file", help="the .gguf file to convert")
    p.add_argument("out_dir", help="the directory to create (must not exist or be empty)")
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from jaxmoelora.loading.gguf import convert_gguf_to_hf

    if not Path(args.gguf_file).is_file():
        raise CheckpointError(f"GGUF file {args.gguf_file} does not exist")
    start = time.perf_counter()
    out = convert_gguf_to_hf(args.gguf_file, args.out_dir)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
