"""Sharding: every parameter names its logical axes, and a model loaded onto an 8-device CPU mesh (data x tensor, and
data x fsdp x tensor) is really split across the devices and gives the unsharded logits, with and without adapters.

The mesh runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8, so this pytest process keeps
its single CPU device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from flax import nnx

from jaxmoelora.models.config import ModelConfig
from jaxmoelora.models.decoder import abstract_model
from jaxmoelora.sharding.rules import DEFAULT_RULES

LOGICAL_AXES = {name for name, _ in DEFAULT_RULES}


def test_every_parameter_names_a_known_logical_axis_per_dimension():
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, qk_norm=True, qkv_bias=True, tie_word_embeddings=False)
    variables = nnx.to_flat_state(nnx.state(abstract_model(config), nnx.Param))
    assert len(variables) > 10
    for path, variable in variables:
        axes = variable.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == variable.get_value().ndim, (path, axes)
        assert set(axes) <= LOGICAL_AXES, (path, axes)
        assert (axes[0] == "layers") == (path[0] == "layers"), (path, axes)


SHARDED_EQUALS_UNSHARDED = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jaxmoelora import from_pretrained, preset
    from jaxmoelora.sharding.rules import batch_sharding, make_mesh

    assert jax.device_count() == 8, jax.devices()
    path = sys.argv[1]
    rng = np.random.default_rng(0)
    ids_bt = rng.integers(3, 128, size=(4, 12)).astype(np.int32)
    mask_bt = np.ones((4, 12), bool)
    mask_bt[1, :5] = False  # left padding
    mask_bt[3, :2] = False
    adapter = preset("loramoe", init_b="normal")  # B != 0, so the experts change the logits

    @jax.jit
    def logits(state, ids_bt, mask_bt):
        return nnx.merge(graphdef, state)(ids_bt, attention_mask_bt=mask_bt).logits_btv

    def spec(array):
        return tuple(array.sharding.spec)

    unsharded = {}
    for name, kwargs in [("base", {}), ("loramoe", dict(adapter=adapter))]:
        model = from_pretrained(path, **kwargs)
        graphdef, state = nnx.split(model)
        unsharded[name] = np.asarray(logits(state, ids_bt, mask_bt))
    assert np.abs(unsharded["loramoe"] - unsharded["base"]).max() > 1e-3, "the adapter should change the logits"

    for axes in [{"data": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2}]:
        mesh = make_mesh(axes)
        for name, kwargs in [("base", {}), ("loramoe", dict(adapter=adapter))]:
            model = from_pretrained(path, mesh=mesh, **kwargs)
            q_kernel = model.layers.self_attn.q_proj.kernel[...]
            up_kernel = model.layers.mlp.up_proj.kernel[...] if name == "base" else (
                model.layers.mlp.up_proj.base.kernel[...])
            embedding = model.embed_tokens.embedding[...]
            assert "tensor" in spec(q_kernel) and "tensor" in spec(up_kernel), (spec(q_kernel), spec(up_kernel))
            assert len(q_kernel.sharding.device_set) == 8
            shard_shape = q_kernel.addressable_shards[0].data.shape
            assert shard_shape[-1] == q_kernel.shape[-1] // axes["tensor"], (shard_shape, q_kernel.shape)
            if "fsdp" in axes:
                assert "fsdp" in spec(embedding) and "fsdp" in spec(q_kernel), (spec(embedding), spec(q_kernel))
            if name == "loramoe":
                lora_b = model.layers.mlp.up_proj.experts.lora_b[...]  # (layers, experts, rank, mlp)
                assert "tensor" in spec(lora_b), spec(lora_b)
            graphdef, state = nnx.split(model)
            sharded_ids = jax.device_put(ids_bt, batch_sharding(mesh))
            sharded_mask = jax.device_put(mask_bt, batch_sharding(mesh))
            assert "data" in str(sharded_ids.sharding.spec)
            out = np.asarray(logits(state, sharded_ids, sharded_mask))
            diff = np.abs(out - unsharded[name])[mask_bt].max()
            assert diff <= 1e-5, (axes, name, diff)
            print(f"{axes} {name}: max |sharded - unsharded| = {diff:.2e}")
    print("OK")
""")


def test_sharded_model_on_8_devices_gives_the_unsharded_logits(tiny_llama_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SHARDED_EQUALS_UNSHARDED, str(tiny_llama_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
