"""What a user reads after a run: metrics.jsonl with the loss, each auxiliary loss, the learning rate, gradient norm,
throughput and per-layer router statistics; TensorBoard events with the same scalars; loss.png and expert_load.png."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from jaxmoelora.training.optimizer import learning_rate_schedule

PNG = b"\x89PNG\r\n\x1a\n"


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]


def router_stat(record: dict, stat: str) -> dict[str, dict[int, list[float]]]:
    """{module: {layer: values}} of `router/<module>/<stat>/layer<i>[/e<j>]` (experts in order)."""
    out: dict[str, dict[int, list[float]]] = {}
    for key in sorted(record, key=lambda k: [int(p[1:]) if p[:1] == "e" and p[1:].isdigit() else p
                                              for p in k.split("/")]):
        parts = key.split("/")
        if parts[0] == "router" and parts[2] == stat:
            out.setdefault(parts[1], {}).setdefault(int(parts[3][len("layer"):]), []).append(record[key])
    return out


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the TFRecord event files in `directory`, read with tensorboardX's protobuf."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in sorted(directory.glob("events.out.tfevents.*")):
        data, i = file.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.parametrize("method, aux", [("lora", set()), ("loramoe", {"aux/lbc"}),
                                         ("moelora", {"aux/load_balance", "aux/contrastive"}),
                                         ("slim", {"aux/l1"})])
def test_metrics_jsonl_has_losses_rate_norm_throughput(runs, method, aux):
    run = runs.reference(method)
    rows = records(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    schedule = learning_rate_schedule(run.config.train, run.config.train.learning_rate)
    for r in rows:
        assert {k for k in r if k.startswith("aux/")} == aux  # each weighted auxiliary loss, by name
        assert math.isclose(r["loss"], r["ce"] + sum(v for k, v in r.items() if k.startswith("aux/")), rel_tol=1e-6)
        assert math.isclose(r["learning_rate"], float(schedule(r["step"] - 1)), rel_tol=1e-5)
        assert r["grad_norm"] > 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["step_seconds"] > 0
    assert rows[0]["learning_rate"] == pytest.approx(0.01) and rows[-1]["learning_rate"] < rows[0]["learning_rate"]


@pytest.mark.parametrize("method, modules", [("loramoe", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
                                             ("moelora", {"self_attn.q_proj", "self_attn.v_proj"}),
                                             ("slim", None)])
def test_router_load_share_and_entropy_per_layer(runs, method, modules):
    run = runs.reference(method)
    experts = run.config.adapter.num_experts
    for r in records(run):
        load = router_stat(r, "load_share")
        entropy = router_stat(r, "router_entropy")
        assert load and load.keys() == entropy.keys()
        if modules is not None:
            assert set(load) == modules
        for module, layers in load.items():
            assert sorted(layers) == [0, 1]  # the tiny model's 2 layers
            for layer, shares in layers.items():
                assert len(shares) == experts and np.isclose(sum(shares), 1.0, atol=1e-5), (module, layer, shares)
                assert 0 <= entropy[module][layer][0] <= math.log(experts) + 1e-5


def test_slim_reports_identity_share(runs):
    run = runs.reference("slim")
    for r in records(run):
        identity = router_stat(r, "identity_share")
        assert identity, sorted(k for k in r if k.startswith("router/"))[:10]
        assert all(0 <= v[0] <= 1 for layers in identity.values() for v in layers.values())


def test_tensorboard_events_hold_the_same_scalars(runs):
    run = runs.reference("loramoe")
    scalars = tensorboard_scalars(run.output_dir / "tensorboard")
    rows = records(run)
    for tag in ("loss", "aux/lbc", "learning_rate", "grad_norm", "tokens_per_s",
                "router/mlp.up_proj/load_share/layer1/e5", "router/mlp.up_proj/router_entropy/layer0"):
        assert [step for step, _ in scalars[tag]] == list(range(1, 13)), tag
        assert np.allclose([v for _, v in scalars[tag]], [r[tag] for r in rows], rtol=1e-6), tag


@pytest.mark.parametrize("method, plots", [("loramoe", {"loss.png", "expert_load.png"}), ("lora", {"loss.png"})])
def test_loss_and_expert_load_plots(runs, method, plots):
    run = runs.reference(method)
    assert {p.name for p in run.result.plots} == plots
    written = {p.name for p in run.output_dir.glob("*.png")}
    assert written == plots
    for name in plots:
        data = (run.output_dir / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
