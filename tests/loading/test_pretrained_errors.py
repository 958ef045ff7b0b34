"""Bad input to `from_pretrained` and `load_tokenizer`: each error is a jaxmoelora error that names the problem and,
where it applies, the file and the tensor. (Unknown GGUF tensor types are covered in test_gguf.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxmoelora import from_pretrained, load_tokenizer
from jaxmoelora.errors import CheckpointError, TokenizerError, UnsupportedArchitectureError
from jaxmoelora.models.config import SUPPORTED_ARCHITECTURES


@pytest.fixture
def checkpoint(tiny_llama_dir, tmp_path) -> Path:
    """A private copy of the tiny Llama checkpoint, free to break."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_the_intact_copy_loads(checkpoint):
    assert from_pretrained(checkpoint).config.intermediate_size == 96


# ----- missing and unreadable files -----------------------------------------------------------------------------------

def test_a_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        from_pretrained(missing)


def test_a_directory_without_config_json(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"{re.escape(str(checkpoint))} has no config.json"):
        from_pretrained(checkpoint)


def test_a_config_json_that_is_not_json_names_the_file(checkpoint):
    (checkpoint / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint / "config.json"))):
        from_pretrained(checkpoint)


def test_a_directory_without_safetensors(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json in"):
        from_pretrained(checkpoint)


def test_shards_without_an_index_are_named(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"found \['model-00001-of-00002.safetensors'\]; add an index file"):
        from_pretrained(checkpoint)


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated-data", "truncated-header"])
def test_a_corrupt_safetensors_file_is_named(checkpoint, damage):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"garbage": os.urandom(4096), "empty": b"", "truncated-data": data[:len(data) // 2],
                      "truncated-header": data[:100]}[damage])
    with pytest.raises(CheckpointError, match=f"cannot read {re.escape(str(file))}.*truncated or not safetensors"):
        from_pretrained(checkpoint)


def split_into_two_shards(directory: Path, drop_file: bool = False, unlisted: str | None = None) -> dict:
    """Rewrites the checkpoint as two shards with an index, as transformers saves large models."""
    tensors = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in halves.items():
        if not (drop_file and file.startswith("model-00002")):
            save_file({n: tensors[n] for n in part}, str(directory / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in part if n != unlisted}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoints_load_like_the_single_file(checkpoint, tiny_llama_dir):
    split_into_two_shards(checkpoint)
    single, sharded = from_pretrained(tiny_llama_dir), from_pretrained(checkpoint)
    np.testing.assert_array_equal(sharded.layers.mlp.up_proj.kernel[...], single.layers.mlp.up_proj.kernel[...])
    np.testing.assert_array_equal(sharded.lm_head.kernel[...], single.lm_head.kernel[...])


def test_a_shard_listed_in_the_index_but_missing_is_named(checkpoint):
    split_into_two_shards(checkpoint, drop_file=True)
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is listed in "
                                              "model.safetensors.index.json but does not exist"):
        from_pretrained(checkpoint)


def test_an_index_without_a_weight_map_is_named(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="cannot read the safetensors index .*model.safetensors.index.json"):
        from_pretrained(checkpoint)


# ----- checkpoint and config.json disagree ----------------------------------------------------------------------------

def test_a_tensor_shape_that_contradicts_config_names_tensor_file_and_both_shapes(checkpoint):
    edit_config(checkpoint, intermediate_size=80)  # the checkpoint's MLP is 96 wide
    with pytest.raises(CheckpointError) as error:
        from_pretrained(checkpoint)
    message = str(error.value)
    tensor = re.search(r"tensor '(model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight)'", message)
    assert tensor, message
    assert str(checkpoint / "model.safetensors") in message
    found, implied = ((96, 64), (80, 64)) if tensor.group(2) != "down" else ((64, 96), (64, 80))
    assert f"has shape {found}" in message and f"config.json implies {implied}" in message, message


def test_a_vocabulary_size_that_contradicts_config_names_the_embedding(checkpoint):
    edit_config(checkpoint, vocab_size=100)
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' .* has shape \(128, 64\), "
                                              r"but config.json implies \(100, 64\)"):
        from_pretrained(checkpoint)


def delete_tensor(checkpoint: Path, name: str) -> Path:
    """Removes one tensor from the checkpoint's model.safetensors; returns that file."""
    file = checkpoint / "model.safetensors"
    tensors = load_file(str(file))
    del tensors[name]
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


def test_a_missing_tensor_is_named_with_the_file_it_was_looked_for_in(checkpoint):
    file = delete_tensor(checkpoint, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match=f"'model.layers.1.mlp.up_proj.weight' is not in {re.escape(str(file))}"):
        from_pretrained(checkpoint)


def test_a_tensor_missing_from_the_index_is_named(checkpoint):
    split_into_two_shards(checkpoint, unlisted="model.norm.weight")
    with pytest.raises(CheckpointError, match="'model.norm.weight' is not listed in .*model.safetensors.index.json"):
        from_pretrained(checkpoint)


def test_more_layers_in_config_than_in_the_checkpoint(checkpoint):
    edit_config(checkpoint, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\..*' is not in"):
        from_pretrained(checkpoint)


def test_an_untied_config_without_lm_head_says_to_tie(checkpoint):
    delete_tensor(checkpoint, "lm_head.weight")
    with pytest.raises(CheckpointError, match="no lm_head.weight .* set tie_word_embeddings=true"):
        from_pretrained(checkpoint)


# ----- unsupported architectures --------------------------------------------------------------------------------------

def test_an_unsupported_architecture_names_the_supported_ones(tmp_path):
    import transformers
    transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel") as error:
        from_pretrained(tmp_path)
    assert all(name in str(error.value) for name in SUPPORTED_ARCHITECTURES), error.value


def test_an_architecture_transformers_does_not_know_is_still_named_as_unsupported(checkpoint):
    edit_config(checkpoint, model_type="brand_new_model", architectures=["BrandNewForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError, match="BrandNewForCausalLM.*LlamaForCausalLM"):
        from_pretrained(checkpoint)


# ----- tokenizers -----------------------------------------------------------------------------------------------------

def test_a_directory_without_tokenizer_files_is_a_tokenizer_error(checkpoint):
    with pytest.raises(TokenizerError, match=f"{re.escape(str(checkpoint))}: it has none of .*tokenizer.json"):
        load_tokenizer(checkpoint)


def test_a_corrupt_tokenizer_json_is_a_tokenizer_error(checkpoint):
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=f"cannot build a tokenizer from {re.escape(str(checkpoint))}"):
        load_tokenizer(checkpoint)
