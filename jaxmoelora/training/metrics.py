"""What the user sees: a progress bar with loss, tokens/s and ETA; metrics to JSONL and TensorBoard; PNG plots."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalars as they are; router statistics per module and layer (`router/<module>/<stat>/layer<i>[/e<j>]`)."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if name == "router":
            for module, stats in value.items():
                for stat, array in stats.items():
                    array = np.asarray(array)
                    for layer, row in enumerate(array):
                        if np.ndim(row) == 0:
                            flat[f"router/{module}/{stat}/layer{layer}"] = float(row)
                        else:
                            for e, v in enumerate(row):
                                flat[f"router/{module}/{stat}/layer{layer}/e{e}"] = float(v)
        else:
            flat[name] = float(np.asarray(value))
    return flat


def summarize_router(router: dict[str, Any]) -> dict[str, float]:
    """Model-wide router health for the progress bar: mean entropy, the largest expert load share, identity share."""
    if not router:
        return {}
    entropy = np.mean([np.mean(np.asarray(s["router_entropy"])) for s in router.values()])
    max_load = np.max([np.max(np.asarray(s["load_share"])) for s in router.values()])
    out = {"entropy": float(entropy), "max_load": float(max_load)}
    identity = [np.mean(np.asarray(s["identity_share"])) for s in router.values() if "identity_share" in s]
    if identity:
        out["identity"] = float(np.mean(identity))
    return out


class MetricsLogger:
    """Writes metric records on process 0 only (`enabled`)."""

    def __init__(self, output_dir: Path, *, total_steps: int, start_step: int, enabled: bool, progress: bool,
                 tensorboard: bool):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.history: list[dict[str, float]] = []
        self._tb = None
        self._bar = None
        self._tokens = 0
        self._start = time.perf_counter()
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.history = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.history = [h for h in self.history if h.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(output_dir / "tensorboard"))
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any], step_seconds: float) -> dict[str, float]:
        record = {"step": step, **flatten_metrics(metrics)}
        record["step_seconds"] = step_seconds
        record["tokens_per_s"] = record.get("tokens", 0.0) / max(step_seconds, 1e-9)
        self._tokens += int(record.get("tokens", 0))
        if not self.enabled:
            return record
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in record.items():
                if name != "step" and math.isfinite(value):
                    self._tb.add_scalar(name, value, step)
        if self._bar is not None:
            shown = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
            shown |= {k: f"{v:.3f}" for k, v in summarize_router(metrics.get("router", {})).items()}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)
        return record

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def plot_run(history: list[dict[str, float]], output_dir: Path) -> list[Path]:
    """loss.png (loss curve with auxiliary losses) and expert_load.png (final load share per layer and expert, one
    panel per routed module). Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if not history:
        return written
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["ce"] for h in history], label="cross-entropy")
    for name in sorted({k for h in history for k in h if k.startswith("aux/")}):
        ax.plot(steps, [h.get(name, np.nan) for h in history], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend()
    fig.tight_layout()
    path = output_dir / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    last = history[-1]
    modules = sorted({k.split("/")[1] for k in last if k.startswith("router/") and "/load_share/" in k})
    if modules:
        fig, axes = plt.subplots(1, len(modules), figsize=(4 * len(modules), 4), squeeze=False)
        for ax, module in zip(axes[0], modules):
            keys = [k for k in last if k.startswith(f"router/{module}/load_share/")]
            layers = 1 + max(int(k.split("/")[3][5:]) for k in keys)
            experts = 1 + max(int(k.split("/")[4][1:]) for k in keys)
            grid = np.zeros((layers, experts))
            for k in keys:
                grid[int(k.split("/")[3][5:]), int(k.split("/")[4][1:])] = last[k]
            image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
            ax.set_xticks(range(experts))
            ax.set_yticks(range(layers))
            ax.set_title(f"{module}: load share")
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax)
        fig.suptitle(f"expert load per layer at step {int(last['step'])}")
        fig.tight_layout()
        path = output_dir / "expert_load.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
