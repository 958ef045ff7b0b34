"""Read llama.cpp GGUF checkpoints and convert them to Hugging Face model directories.

`GGUFCheckpoint` gives a GGUF file's config, weights and tokenizer in Hugging Face form without torch:
weights come back as float32 arrays in HF layout `(out, in)`, one tensor at a time, dequantized with
`gguf.quants` and with llama.cpp's Q/K row permutation undone. `convert_gguf_to_hf` writes the directory
that `transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from jaxmoelora.errors import CheckpointError, TokenizerError, UnsupportedArchitectureError

# GGUF architecture -> (HF class, HF model_type).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

SUPPORTED_TENSOR_TYPES: frozenset[QType] = frozenset(
    {
        QType.F32, QType.F16, QType.BF16,
        QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
        QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
    }
)  # fmt: skip

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp's llama3 RoPE scaling is stored as a tensor of per-frequency divisors, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"

# Pre-tokenizer regexes for `tokenizer.ggml.pre` values whose split differs from GPT-2's; the same table as
# transformers' GGUF tokenizer loader (`integrations/gguf/gguf_tokenizer_mapping.py`).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
_SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids the GGUF metadata names; None where the file names none."""

    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None


class GGUFCheckpoint:
    """A GGUF file read lazily (memory-mapped) and presented in Hugging Face terms."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file not found: {self.path}. Pass the path of an existing .gguf file.")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, KeyError) as error:
            raise CheckpointError(
                f"Cannot read {self.path} as GGUF ({error}). The file may be truncated, not a GGUF file, or use a "
                f"tensor type the installed gguf package does not know; supported tensor types: "
                f"{_type_names(SUPPORTED_TENSOR_TYPES)}."
            ) from error
        if self._value("split.count", 1) > 1:
            raise CheckpointError(
                f"{self.path} is one part of a split GGUF. Merge the parts first "
                "(`llama-gguf-split --merge FIRST_PART.gguf merged.gguf`) and pass the merged file."
            )
        self.architecture: str = self._value("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{self.path} holds a {self.architecture!r} model; supported GGUF architectures: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}. Use a GGUF of a supported family."
            )
        by_gguf_name = {tensor.name: tensor for tensor in self._reader.tensors}
        self._rope_freqs = by_gguf_name.pop(_ROPE_FREQS, None)
        self._tensors = {self._hf_name(name): tensor for name, tensor in by_gguf_name.items()}
        for required in ("model.embed_tokens.weight", "model.norm.weight"):
            if required not in self._tensors:
                raise CheckpointError(f"{self.path} has no tensor for {required}; the file is incomplete.")

    # ----- metadata -----------------------------------------------------------------------------------------------

    def _value(self, key: str, default: Any = ...) -> Any:
        """The metadata value under `key`; float32 values rounded to their shortest decimal (1e-05, not 9.99e-06)."""
        field = self._reader.get_field(key)
        if field is None:
            if default is ...:
                raise CheckpointError(f"{self.path} lacks the GGUF metadata key {key!r}; the file is incomplete.")
            return default
        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            return float(str(np.float32(value)))
        return value

    def _arch_value(self, key: str, default: Any = ...) -> Any:
        return self._value(f"{self.architecture}.{key}", default)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the file, if any."""
        return self._value("tokenizer.chat_template", None)

    @property
    def special_tokens(self) -> SpecialTokenIds:
        """The bos/eos/pad/unk token ids from the tokenizer metadata."""
        return SpecialTokenIds(
            bos=self._value("tokenizer.ggml.bos_token_id", None),
            eos=self._value("tokenizer.ggml.eos_token_id", None),
            pad=self._value("tokenizer.ggml.padding_token_id", None),
            unk=self._value("tokenizer.ggml.unknown_token_id", None),
        )

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict for this model."""
        hf_class, model_type = SUPPORTED_ARCHITECTURES[self.architecture]
        hidden = self._arch_value("embedding_length")
        heads = self._arch_value("attention.head_count")
        head_dim = self._arch_value("attention.key_length", None)
        if head_dim is None and self.architecture == "llama":
            head_dim = self._arch_value("rope.dimension_count", None)
        rope_theta = self._arch_value("rope.freq_base", 10000.0)
        special = self.special_tokens
        has_bias = {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} & self._tensors.keys()
        config: dict[str, Any] = {
            "architectures": [hf_class],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self._arch_value("feed_forward_length"),
            "num_hidden_layers": self._arch_value("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._arch_value("attention.head_count_kv", heads),
            "head_dim": head_dim or hidden // heads,
            "hidden_act": "silu",
            "rms_norm_eps": self._arch_value("attention.layer_norm_rms_epsilon"),
            "rope_theta": rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, **self._rope_scaling()},
            "max_position_embeddings": self._arch_value("context_length"),
            "vocab_size": int(self._tensors["model.embed_tokens.weight"].shape[1]),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": special.bos,
            "eos_token_id": special.eos,
            "pad_token_id": special.pad,
            "attention_bias": bool(has_bias),
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "dtype": "float32",
        }
        if self.architecture == "llama":
            config["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in self._tensors
        return config

    def _rope_scaling(self) -> dict[str, Any]:
        """Rope scaling entries for `rope_parameters` (linear, yarn, or llama3 from a `rope_freqs` tensor)."""
        if self._rope_freqs is not None:
            return self._llama3_rope_scaling()
        kind = self._arch_value("rope.scaling.type", "none")
        if kind == "none":
            return {}
        factor = self._arch_value("rope.scaling.factor")
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            yarn: dict[str, Any] = {
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": self._arch_value("rope.scaling.original_context_length"),
            }
            for key in ("beta_fast", "beta_slow"):
                if (value := self._arch_value(f"rope.scaling.yarn_{key}", None)) is not None:
                    yarn[key] = value
            return yarn
        raise UnsupportedArchitectureError(
            f"{self.path} uses rope scaling {kind!r}; supported: none, linear, yarn, llama3."
        )

    def _llama3_rope_scaling(self) -> dict[str, Any]:
        """Recover llama3 rope scaling from the `rope_freqs` tensor, checking it against Llama 3's constants."""
        assert self._rope_freqs is not None
        divisors = np.asarray(gguf.quants.dequantize(self._rope_freqs.data, self._rope_freqs.tensor_type), np.float64)
        params = {
            "factor": float(str(np.float32(divisors.max()))),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": self._arch_value("rope.scaling.original_context_length", 8192),
        }
        expected = llama3_rope_divisors(self._arch_value("rope.freq_base", 10000.0), 2 * divisors.size, **params)
        if not np.allclose(divisors.ravel(), expected, rtol=1e-4):
            raise UnsupportedArchitectureError(
                f"{self.path} has a {_ROPE_FREQS} tensor that does not follow Llama 3's rope scaling "
                "(low_freq_factor 1, high_freq_factor 4); this per-frequency scaling is not supported."
            )
        return {"rope_type": "llama3", **params}

    # ----- weights ------------------------------------------------------------------------------------------------

    def _hf_name(self, gguf_name: str) -> str:
        stem, _, suffix = gguf_name.rpartition(".")
        if stem in _TOP_LEVEL_NAMES and suffix == "weight":
            return f"{_TOP_LEVEL_NAMES[stem]}.weight"
        match = _BLOCK_TENSOR.fullmatch(gguf_name)
        if match and match.group(2) in _BLOCK_NAMES:
            layer, part, kind = match.groups()
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
        raise CheckpointError(
            f"{self.path} has a tensor {gguf_name!r} that has no place in a {self.architecture} model; "
            "the file may be a different variant of this architecture, which is not supported."
        )

    def tensor_names(self) -> list[str]:
        """The HF names of the weights in this file: embeddings, then layer by layer, then the final norm and head."""

        def order(name: str) -> tuple[int, int, str]:
            if name.startswith("model.layers."):
                return (1, int(name.split(".")[2]), name)
            return (0 if name == "model.embed_tokens.weight" else 2, 0, name)

        return sorted(self._tensors, key=order)

    def tensor_shape(self, hf_name: str) -> tuple[int, ...]:
        """The HF-layout shape of a weight (the GGUF shape reversed)."""
        return tuple(int(d) for d in reversed(self._tensor(hf_name).shape))

    def _tensor(self, hf_name: str) -> gguf.ReaderTensor:
        try:
            return self._tensors[hf_name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {hf_name!r}; see tensor_names().") from None

    def check_tensor_types(self) -> None:
        """Raise `CheckpointError` unless every weight's tensor type can be dequantized."""
        for hf_name in self._tensors:
            self._check_type(hf_name)

    def _check_type(self, hf_name: str) -> None:
        tensor = self._tensor(hf_name)
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise CheckpointError(
                f"{self.path}: tensor {tensor.name!r} ({hf_name}) has type {tensor.tensor_type.name}, which cannot "
                f"be dequantized. Supported types: {_type_names(SUPPORTED_TENSOR_TYPES)}. Re-quantize the model "
                "with one of these (e.g. llama-quantize ... Q8_0)."
            )

    def get_tensor(self, hf_name: str) -> np.ndarray:
        """One weight as a float32 array in HF layout (dequantized; Q/K rows un-permuted for llama)."""
        self._check_type(hf_name)
        tensor = self._tensor(hf_name)
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weight = np.array(weight, dtype=np.float32).reshape(self.tensor_shape(hf_name))  # copies off the mmap
        if self.architecture == "llama":
            if ".self_attn.q_proj." in hf_name:
                weight = unpermute_qk_rows(weight, self._arch_value("attention.head_count"))
            elif ".self_attn.k_proj." in hf_name:
                heads = self._arch_value("attention.head_count")
                weight = unpermute_qk_rows(weight, self._arch_value("attention.head_count_kv", heads))
        return weight

    # ----- tokenizer ----------------------------------------------------------------------------------------------

    def tokenizer(self) -> Tokenizer:
        """A `tokenizers.Tokenizer` built from the file's vocabulary metadata (byte-level BPE or sentencepiece BPE)."""
        model = self._value("tokenizer.ggml.model", None)
        if model is None:
            raise TokenizerError(
                f"{self.path} has no tokenizer metadata (tokenizer.ggml.model). Use a GGUF that embeds its "
                "tokenizer, or pass a Hugging Face model directory with a tokenizer.json."
            )
        if model not in _SUPPORTED_TOKENIZER_MODELS:
            raise TokenizerError(
                f"{self.path} uses the tokenizer model {model!r}; supported: {', '.join(_SUPPORTED_TOKENIZER_MODELS)}."
            )
        tokens: list[str] = self._value("tokenizer.ggml.tokens", None) or []
        if not tokens:
            raise TokenizerError(
                f"{self.path} has tokenizer model {model!r} but no vocabulary (tokenizer.ggml.tokens)."
            )
        token_types: list[int] = self._value("tokenizer.ggml.token_type", None) or []
        tokenizer = self._byte_level_bpe(tokens) if model == "gpt2" else self._sentencepiece_bpe(tokens)

        byte_level = model == "gpt2"
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        vocab = tokenizer.get_vocab()
        control = [
            AddedToken(token, normalized=False, special=True)
            for token, kind in zip(tokens, token_types, strict=False)
            # A byte-level control token outside the byte alphabet is a llama.cpp mislabel (as transformers does).
            if kind == _CONTROL and (not byte_level or set(token) <= alphabet)
        ]
        tokenizer.add_special_tokens(control)
        tokenizer.add_tokens(
            [
                AddedToken(token, normalized=False, special=False)
                for token, kind in zip(tokens, token_types, strict=False)
                if kind == _USER_DEFINED and token in vocab
            ]
        )
        tokenizer.post_processor = self._post_processor(tokens)
        return tokenizer

    def _byte_level_bpe(self, tokens: list[str]) -> Tokenizer:
        merges = self._value("tokenizer.ggml.merges", None)
        if not merges:
            raise TokenizerError(f"{self.path} has a byte-level BPE vocabulary but no merges (tokenizer.ggml.merges).")
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {
            token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
            for index, token in enumerate(tokens)
        }
        tokenizer = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
        split = _PRE_TOKENIZER_SPLITS.get(self._value("tokenizer.ggml.pre", None))
        if split is None:
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer

    def _sentencepiece_bpe(self, tokens: list[str]) -> Tokenizer:
        """Sentencepiece BPE as transformers' `LlamaTokenizer` builds it, merges from the file or from the scores."""
        vocab = {token: index for index, token in enumerate(tokens)}
        merges = self._value("tokenizer.ggml.merges", None)
        if merges:
            pairs = [tuple(m.split(" ", 1)) for m in merges]
        else:
            scores = self._value("tokenizer.ggml.scores", None)
            if not scores:
                raise TokenizerError(f"{self.path} has a sentencepiece vocabulary but neither merges nor scores.")
            pairs = _merges_from_scores(tokens, scores)
        unk = self.special_tokens.unk
        tokenizer = Tokenizer(
            models.BPE(
                vocab, pairs, fuse_unk=True, byte_fallback=True, unk_token=tokens[unk] if unk is not None else None
            )
        )
        add_prefix = bool(self._value("tokenizer.ggml.add_space_prefix", True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
        )
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
        return tokenizer

    def _adds_special(self) -> tuple[bool, bool]:
        """Whether llama.cpp puts bos / eos around each text (by default bos for sentencepiece vocabularies only)."""
        special = self.special_tokens
        sentencepiece = self._value("tokenizer.ggml.model", None) == "llama"
        add_bos = bool(self._value("tokenizer.ggml.add_bos_token", sentencepiece)) and special.bos is not None
        add_eos = bool(self._value("tokenizer.ggml.add_eos_token", False)) and special.eos is not None
        return add_bos, add_eos

    def _post_processor(self, tokens: list[str]) -> processors.TemplateProcessing:
        add_bos, add_eos = self._adds_special()
        special = self.special_tokens
        bos = [(tokens[special.bos], special.bos)] if add_bos and special.bos is not None else []
        eos = [(tokens[special.eos], special.eos)] if add_eos and special.eos is not None else []
        first, last = [token for token, _ in bos], [token for token, _ in eos]
        return processors.TemplateProcessing(
            single=[*first, "$A:0", *last],
            pair=[*first, "$A:0", *last, *first, "$B:1", *last],
            special_tokens=[*bos, *eos],
        )

    def tokenizer_config(self) -> dict[str, Any]:
        """A Hugging Face `tokenizer_config.json` dict (special token strings, bos/eos flags, chat template)."""
        add_bos, add_eos = self._adds_special()
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": add_bos,
            "add_eos_token": add_eos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self._arch_value("context_length"),
            **self.special_tokens_map(),
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def special_tokens_map(self) -> dict[str, str]:
        """The `special_tokens_map.json` dict: bos/eos/pad/unk token strings the file names."""
        tokens: list[str] = self._value("tokenizer.ggml.tokens")
        ids = self.special_tokens
        named = {"bos_token": ids.bos, "eos_token": ids.eos, "pad_token": ids.pad, "unk_token": ids.unk}
        return {name: tokens[index] for name, index in named.items() if index is not None}


def unpermute_qk_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (interleaved RoPE pairs back to HF's rotate-half layout)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_divisors(
    theta: float,
    dim: int,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as `rope_freqs` for Llama 3 rope scaling."""
    wavelengths = 2 * math.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    context = original_max_position_embeddings
    smooth = (context / wavelengths - low_freq_factor) / (high_freq_factor - low_freq_factor)
    divisors = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelengths < context / high_freq_factor, 1.0, divisors)
    return np.where(wavelengths > context / low_freq_factor, factor, divisors)


def convert_gguf_to_hf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write a Hugging Face model directory (fp32 safetensors, config, tokenizer) for a GGUF file.

    The directory appears atomically: it is written next to `out_dir` and renamed into place when complete.
    """
    checkpoint = GGUFCheckpoint(gguf_path)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty directory; remove it or pick another out_dir.")
    checkpoint.check_tensor_types()
    tokenizer = checkpoint.tokenizer()
    config = checkpoint.hf_config()

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model directory
        _write_json(staging / "config.json", config)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        _write_json(staging / "generation_config.json", generation)
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", checkpoint.tokenizer_config())
        _write_json(staging / "special_tokens_map.json", checkpoint.special_tokens_map())
        _write_safetensors(staging / "model.safetensors", checkpoint)
        if out.exists():
            out.rmdir()
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_safetensors(path: Path, checkpoint: GGUFCheckpoint) -> None:
    """Stream every weight into one float32 safetensors file, holding a single tensor in memory at a time.

    Same bytes as `safetensors.numpy.save_file(..., metadata={"format": "pt"})` up to tensor order.
    """
    names = checkpoint.tensor_names()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        shape = checkpoint.tensor_shape(name)
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name in names:
            file.write(checkpoint.get_tensor(name).astype("<f4", copy=False).tobytes())


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens, best score first.

    Same order as transformers' `generate_merges(vocab, vocab_scores)`.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    merges: list[tuple[str, str, float]] = []
    for token, score in zip(tokens, scores, strict=True):
        splits = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        merges.extend(sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}


def _type_names(types: frozenset[QType]) -> str:
    return ", ".join(sorted(t.name for t in types))
