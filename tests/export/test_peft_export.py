"""Export of plain LoRA adapters to Hugging Face PEFT: PyTorch with `peft.PeftModel.from_pretrained` on the exported
directory gives our logits (fp32, 1e-4) on tiny random Llama checkpoints, with plain and rsLoRA scaling, from a model
in memory and from a training run's checkpoint through `jaxmoelora export-peft`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the PyTorch reference (Python 3.11 only here)")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="needs PEFT to load the exported adapter")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import jaxmoelora  # noqa: E402
from jaxmoelora.adapters.config import AdapterConfig  # noqa: E402
from jaxmoelora.cli import USER_ERROR_STATUS, main  # noqa: E402
from jaxmoelora.errors import UnsupportedExportError  # noqa: E402
from jaxmoelora.export import export_peft  # noqa: E402
from jaxmoelora.export.peft import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))  # the training tests' helpers
from training_helpers import (  # noqa: E402
    read_checkpoint_arrays, tiny_overrides, write_arithmetic_jsonl, write_tiny_chat_model)

pytestmark = pytest.mark.torch

TARGETS = ("q_proj", "v_proj", "gate_proj", "down_proj")
PARENTS = {"q_proj": "self_attn", "v_proj": "self_attn", "gate_proj": "mlp", "down_proj": "mlp"}
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module", autouse=True)
def fast_and_light():
    """One torch thread (a shared 2-core machine) and jax settings that compile faster without changing results
    (as in tests/adapters/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    previous = {"jax_threefry_partitionable": jax.config.jax_threefry_partitionable,
                "jax_disable_most_optimizations": jax.config.read("jax_disable_most_optimizations")}
    jax.config.update("jax_threefry_partitionable", False)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    torch.set_num_threads(threads)


def randomize_lora_b(model: nnx.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Random nonzero B factors (zero at initialisation), so the adapter changes the output."""
    state = nnx.state(model, nnx.LoRAParam)
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(state):
        if path[-1] == "lora_b":
            variable.set_value(jnp.asarray(scale * rng.standard_normal(variable.get_value().shape), jnp.float32))
    nnx.update(model, state)


def random_ids(vocab_size: int, shape=(2, 10), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab_size, size=shape).astype(np.int32)


def our_logits(model, ids_bt: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids_bt)).logits_btv)


def load_peft_model(base_dir: Path, adapter_dir: Path):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), attn_implementation="eager",
                                                                 dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf_model, str(adapter_dir)).eval()


def torch_logits(peft_model, ids_bt: np.ndarray, *, adapter: bool = True) -> np.ndarray:
    with torch.no_grad():
        if adapter:
            return peft_model(input_ids=torch.tensor(ids_bt, dtype=torch.long)).logits.float().numpy()
        with peft_model.disable_adapter():
            return peft_model(input_ids=torch.tensor(ids_bt, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module", params=[False, True], ids=["alpha-over-r", "rslora"])
def exported(request, tiny_llama_dir, tmp_path_factory):
    """(our model with random B, the exported directory, PEFT's model loaded from it)."""
    adapter = AdapterConfig(method="lora", target_modules=TARGETS, rank=RANK, alpha=ALPHA, use_rslora=request.param)
    model = jaxmoelora.from_pretrained(tiny_llama_dir, adapter=adapter)
    randomize_lora_b(model)
    out = export_peft(model, tmp_path_factory.mktemp("peft-adapter"), base_model_name_or_path=str(tiny_llama_dir))
    return model, out, load_peft_model(tiny_llama_dir, out)


def test_peft_gives_our_logits(exported):
    model, _, peft_model = exported
    ids_bt = random_ids(model.config.vocab_size)
    theirs_btv = torch_logits(peft_model, ids_bt)
    assert np.abs(theirs_btv - torch_logits(peft_model, ids_bt, adapter=False)).max() > 1e-2, \
        "the adapter should change the logits it is compared on"
    np.testing.assert_allclose(our_logits(model, ids_bt), theirs_btv, rtol=0, atol=1e-4)


def test_peft_scales_as_we_do(exported):
    model, _, peft_model = exported
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(model.adapter_config.scaling)
    expected = ALPHA / (RANK ** 0.5 if model.adapter_config.use_rslora else RANK)
    assert q_proj.scaling["default"] == pytest.approx(expected)


def test_the_file_holds_only_the_adapter_under_peft_names(exported):
    model, out, peft_model = exported
    tensors = load_file(str(out / WEIGHTS_FILE))
    config = model.config
    expected = {}
    for layer in range(config.num_layers):
        for name, parent in PARENTS.items():
            linear = getattr(getattr(model.layers, parent), name)
            d_in, d_out = linear.base.kernel.shape[-2:]
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{name}"
            expected[f"{prefix}.lora_A.weight"] = (RANK, d_in)
            expected[f"{prefix}.lora_B.weight"] = (d_out, RANK)
    assert {k: v.shape for k, v in tensors.items()} == expected
    assert set(tensors) == set(peft.get_peft_model_state_dict(peft_model))
    down_proj = model.layers.mlp.down_proj.experts
    np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"],
                                  np.asarray(down_proj.lora_a[...])[1, 0].T)
    np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"],
                                  np.asarray(down_proj.lora_b[...])[1, 0].T)

    saved = json.loads((out / CONFIG_FILE).read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM" and saved["bias"] == "none"
    assert (saved["r"], saved["lora_alpha"], saved["use_rslora"]) == (RANK, ALPHA, model.adapter_config.use_rslora)
    assert sorted(saved["target_modules"]) == sorted(TARGETS)


def test_a_mixture_of_experts_cannot_be_exported(tiny_llama_dir, tmp_path):
    model = jaxmoelora.from_pretrained(tiny_llama_dir, adapter="loramoe")
    with pytest.raises(UnsupportedExportError, match="'loramoe'.*only the 'lora' method"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_without_adapter_cannot_be_exported(tiny_llama_dir, tmp_path):
    with pytest.raises(UnsupportedExportError, match="no adapter"):
        export_peft(jaxmoelora.from_pretrained(tiny_llama_dir), tmp_path / "out")


def test_export_peft_command_exports_a_training_checkpoint(tmp_path, capsys):
    from jaxmoelora.training.config import load_experiment
    from jaxmoelora.training.restore import find_run_checkpoint, restore_model
    from jaxmoelora.training.trainer import train

    model_dir = write_tiny_chat_model(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "sums.jsonl")
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(model_dir, data, run_dir, method="lora", steps=2),
                 "adapter.target_modules=[q_proj,v_proj,down_proj]"]
    result = train(load_experiment(None, overrides), quiet=True)
    assert result.step == 2

    out = tmp_path / "peft"
    assert main(["export-peft", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / CONFIG_FILE).read_text())["base_model_name_or_path"] == str(model_dir)

    checkpoint = find_run_checkpoint(run_dir)
    model = restore_model(checkpoint)
    saved = read_checkpoint_arrays(run_dir / "checkpoints", checkpoint.step)
    trained_b = saved["trainable/layers/self_attn/v_proj/experts/lora_b/value"]
    assert np.abs(trained_b).max() > 0, "two steps of training should move B away from zero"
    np.testing.assert_array_equal(np.asarray(model.layers.self_attn.v_proj.experts.lora_b[...]), trained_b)

    peft_model = load_peft_model(model_dir, out)
    ids_bt = random_ids(model.config.vocab_size)
    np.testing.assert_allclose(our_logits(model, ids_bt), torch_logits(peft_model, ids_bt), rtol=0, atol=1e-4)


def test_export_peft_command_reports_a_missing_run(tmp_path, capsys):
    assert main(["export-peft", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) \
        == USER_ERROR_STATUS
    assert "is not a training run" in capsys.readouterr().err
