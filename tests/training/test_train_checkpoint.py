"""A checkpoint is the adapter's, not the model's: adapters, routers, non-trainable adapter state (SLIM's clusters),
AdamW's two moments of each trainable leaf, step counts and the RNG, and never a base weight."""

from __future__ import annotations

import jax
import pytest
from training_helpers import path_name, read_checkpoint_arrays, tiny_overrides, write_tiny_chat_model

from jaxmoelora.loading.pretrained import from_pretrained
from jaxmoelora.training.checkpointing import checkpoint_bytes
from jaxmoelora.training.config import load_experiment
from jaxmoelora.training.optimizer import make_optimizer, split_by_labels
from jaxmoelora.training.trainer import train


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def names(tree) -> list[str]:
    return [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.fixture(scope="module")
def slim_run(tmp_path_factory, arithmetic_jsonl):
    """2 steps of slim on a model wide enough (hidden 256, FFN 1024: 8 MB of base weights) that orbax's fixed metadata
    is small beside the ~1.5 MB of adapter and optimizer state; and that state's parts, built apart from training."""
    root = tmp_path_factory.mktemp("slim-size")
    model_dir = write_tiny_chat_model(root / "model", hidden=256, intermediate=1024)
    config = load_experiment(None, tiny_overrides(model_dir, arithmetic_jsonl, root / "run", "slim", steps=2))
    result = train(config, quiet=True)
    model = from_pretrained(model_dir, adapter=config.adapter, adapter_seed=config.train.seed)
    _, trainable, adapter_state, frozen = split_by_labels(model)
    opt_state = jax.eval_shape(make_optimizer(config.train, trainable).init, trainable)
    return result, trainable, adapter_state, frozen, opt_state


def test_checkpoint_size_is_the_adapter_state_not_the_base(slim_run):
    """The arrays saved are exactly the adapter, router, adapter-state and optimizer bytes; on disk (compressed by
    orbax: experts that got no gradient yet hold zeros) the checkpoint is at most 10% above that, metadata included,
    and a fraction of the base."""
    result, trainable, adapter_state, frozen, opt_state = slim_run
    step_and_rng = 4 + 8  # int32 step, uint32[2] key
    expected = nbytes(trainable) + nbytes(adapter_state) + nbytes(opt_state) + step_and_rng
    saved = read_checkpoint_arrays(result.checkpoint_dir, 2)
    assert sum(a.nbytes for a in saved.values()) == expected
    size = checkpoint_bytes(result.checkpoint_dir, 2)
    assert size <= 1.1 * expected, f"checkpoint {size} bytes, adapter+router+state+optimizer {expected}"
    assert size < 0.25 * nbytes(frozen), f"checkpoint {size} bytes, base {nbytes(frozen)}"


def test_checkpoint_tree_has_every_adapter_leaf_and_no_base_leaf(slim_run):
    result, trainable, adapter_state, frozen, _ = slim_run
    saved = read_checkpoint_arrays(result.checkpoint_dir, 2)
    assert {f"trainable/{n}" for n in names(trainable)} == {k for k in saved if k.startswith("trainable/")}
    assert {f"adapter_state/{n}" for n in names(adapter_state)} == {k for k in saved if k.startswith("adapter_state/")}
    assert set(names(adapter_state)) >= {"layers/mlp/cluster_centres/value", "layers/mlp/cluster_sigma/value"}
    base = names(frozen)
    assert any("embed_tokens" in n for n in base) and any("/base/" in n for n in base)
    leaked = [k for k in saved if "embed_tokens" in k or "/base/" in k or "layernorm" in k
              or any(k.endswith(f"/{n}") for n in base)]
    assert not leaked, leaked


def test_optimizer_state_is_two_moments_of_the_trainable_leaves_and_counts(slim_run):
    _, trainable, _, _, opt_state = slim_run
    trainable_names = set(names(trainable))
    moments = {path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(opt_state) if x.ndim}
    counts = [x for x in jax.tree.leaves(opt_state) if not x.ndim]
    assert nbytes(moments) == 2 * nbytes(trainable)
    assert all(x.dtype == jax.numpy.int32 for x in counts) and nbytes(counts) <= 64
    for name in moments:  # ".../mu/<trainable path>" or ".../nu/<trainable path>"
        kind, _, param = name.partition("/mu/") if "/mu/" in name else name.partition("/nu/")
        assert param in trainable_names, name
    labels = {"router" if "/inner_states/router/" in n else "adapter" for n in moments}
    assert labels == {"adapter", "router"}
    assert all(("router" in n.split("/mu/")[-1].split("/nu/")[-1]) == ("/inner_states/router/" in n) for n in moments)
