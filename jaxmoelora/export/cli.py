"""`jaxmoelora export-peft --checkpoint RUN_DIR [--step N] --out OUT_DIR`."""

from __future__ import annotations

import argparse
import sys
import time


def add_export_peft_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export-peft", help="write a trained LoRA adapter as a Hugging Face PEFT adapter",
        description="Write the LoRA adapter of a training run's checkpoint as adapter_model.safetensors and "
                    "adapter_config.json, which peft.PeftModel.from_pretrained loads onto the base model. Only the "
                    "'lora' method exports; mixtures of experts have no PEFT equivalent.")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="the output_dir of a `jaxmoelora train` run (or its checkpoints/ directory)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint step to export (default: the newest)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="the directory to write the PEFT adapter into")
    p.set_defaults(run=run_export_peft)


def run_export_peft(args: argparse.Namespace) -> int:
    from jaxmoelora.export.peft import CONFIG_FILE, WEIGHTS_FILE, check_exportable, export_peft
    from jaxmoelora.loading.pretrained import resolve
    from jaxmoelora.training.restore import find_run_checkpoint, restore_model

    start = time.perf_counter()
    checkpoint = find_run_checkpoint(args.checkpoint, args.step)
    check_exportable(checkpoint.adapter)  # before the base model is loaded
    model = restore_model(checkpoint)
    # The Hugging Face directory the run loaded (a .gguf file or a known name is converted there), for transformers.
    base = str(resolve(checkpoint.model.path))
    out = export_peft(model, args.out, base_model_name_or_path=base)
    print(f"exported step {checkpoint.step} of {checkpoint.directory} to {out / WEIGHTS_FILE} and "
          f"{out / CONFIG_FILE} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(out)
    return 0
