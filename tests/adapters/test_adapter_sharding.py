"""Adapters sharded over 8 CPU devices (an `expert` mesh axis beside `data`, and `tensor`) compute what one device
computes: training forward logits and auxiliary losses; the expert stacks really are split over `expert`.

Runs in a subprocess, because the number of host devices is fixed when jax starts."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import jaxmoelora
    from jaxmoelora.models.config import ModelConfig
    from jaxmoelora.models.decoder import init_model
    from jaxmoelora.sharding.rules import batch_sharding, make_mesh, shard_model

    assert jax.device_count() == 8, jax.devices()
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(0)
    ids_bt = rng.integers(1, 64, (4, 16)).astype(np.int32)
    mask_bt = np.ones((4, 16), bool)
    mask_bt[1, 10:] = False
    task_bt = np.where(mask_bt, np.array([[1], [0], [0], [1]]), -1).astype(np.int32)

    def build(name):
        model = jaxmoelora.apply_adapters(init_model(config), name)
        state = nnx.state(model, nnx.LoRAParam)
        values = np.random.default_rng(1)
        for path, variable in nnx.to_flat_state(state):
            if path[-1] == "lora_b":
                variable.set_value(jnp.asarray(0.2 * values.standard_normal(variable.get_value().shape), jnp.float32))
        nnx.update(model, state)
        return model

    def train_forward(model, *batch):
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, ids_bt, mask_bt, task_bt):
            out = nnx.merge(graphdef, state)(ids_bt, attention_mask_bt=mask_bt, train=True, rng=jax.random.key(3),
                                             task_type_bt=task_bt)
            return out.logits_btv, out.aux_losses

        return forward(state, *batch)

    def expert_stacks(model):
        # The (layers, experts, ...) stacks of A and B with more than one expert.
        return [(path, v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
                if v.get_metadata()["logical_axes"][1:2] == ("expert",) and v.get_value().shape[1] > 1]

    # SLIM: FFN mixture with identity experts, clusters and merge masks; MoELoRA: top-k per linear with the
    # sampled contrastive loss and load balancing, its B stacks split over experts and heads.
    CASES = [({"data": 2, "expert": 4}, ["slim"]), ({"data": 2, "tensor": 2, "expert": 2}, ["moelora"])]
    for axes, names in CASES:
        mesh = make_mesh(axes)
        for name in names:
            logits, aux = train_forward(build(name), ids_bt, mask_bt, task_bt)
            model = shard_model(build(name), mesh)
            stacks = expert_stacks(model)
            assert stacks, name
            for path, variable in stacks:
                spec = variable.get_value().sharding.spec
                assert spec[1] == "expert", (name, path, spec)
                assert len(variable.get_value().sharding.device_set) == 8
            if "tensor" in axes:
                assert any("tensor" in v.get_value().sharding.spec for _, v in stacks), name
            batch = [jax.device_put(x, batch_sharding(mesh)) for x in (ids_bt, mask_bt, task_bt)]
            sharded_logits, sharded_aux = train_forward(model, *batch)
            np.testing.assert_allclose(sharded_logits, logits, rtol=1e-5, atol=1e-5)
            assert set(sharded_aux) == set(aux) and aux, (name, aux)
            for key in aux:
                np.testing.assert_allclose(sharded_aux[key], aux[key], rtol=1e-5, atol=1e-6)
            print(name, axes, "ok", flush=True)
    print("OK")
""")


def test_sharded_over_expert_data_and_tensor_axes_equals_one_device():
    # Optimisation passes off only to compile faster (see conftest.py); the SPMD partitioner runs regardless.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
