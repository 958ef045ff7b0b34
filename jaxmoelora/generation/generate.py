"""Batched text generation: left-padded prompts -> one compiled prefill + decode loop per shape bucket.

The whole generation (prefill of the prompts into a fixed-size KV cache, then a `lax.while_loop` that decodes one token
per step until every row has produced an EOS or `max_new_tokens`) is a single compiled function of
(model state, ids, mask, key, ...). Batch size, prompt length and max_new_tokens are rounded up to buckets, and the
compiled executables are kept in `_COMPILED`, keyed by the model's graphdef (its structure and config), the state's
shapes/dtypes/shardings, the buckets and the sampling mode; temperature, top_p, the exact max_new_tokens and the EOS ids
are runtime inputs. So a second call in the same bucket neither retraces nor recompiles.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoelora.errors import ConfigError, TokenizerError
from jaxmoelora.generation.sampling import SamplingMode, sample, sampling_mode
from jaxmoelora.models.decoder import CausalLM, KVCache

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
Messages = list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to continue a prompt. temperature 0 is greedy decoding; top_p 1.0 disables the nucleus cut."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True  # stop a row at its first EOS token (the EOS is kept in the output ids)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0.0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 means greedy decoding)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")

    @property
    def mode(self) -> SamplingMode:
        return sampling_mode(self.temperature, self.top_p)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """New tokens of each prompt and how generation went."""

    tokens_bn: np.ndarray  # (batch, max_new_tokens) int32 new tokens; pad after a row's EOS
    num_tokens_b: np.ndarray  # tokens produced per row, its EOS included
    finish_reasons: tuple[str, ...]  # per row: "eos" (stopped at an EOS token) or "length" (hit max_new_tokens)
    decode_steps: int  # tokens produced by the longest row (the loop stops when every row is finished)
    compile_s: float  # tracing + compilation time of this call (0 when the bucket was already compiled)
    run_s: float  # prefill + decode time, excluding compilation
    texts: tuple[str, ...] | None = None  # decoded continuations, when made by `generate_detailed`
    prompt_tokens_b: np.ndarray | None = None  # prompt lengths in tokens

    @property
    def tokens_per_s(self) -> float:
        return float(self.num_tokens_b.sum()) / self.run_s if self.run_s > 0 else float("nan")


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    size = max(int(minimum), 1)
    while size < n:
        size *= 2
    return size


# ----------------------------------------------------------------------------------------------------------------------
# The compiled prefill + decode loop.

_COMPILED: dict[tuple, Any] = {}  # cache key -> jax `Compiled` executable
_TRACE_COUNT = 0  # how many times the loop was traced (a test hook: equal calls must not retrace)


def trace_count() -> int:
    """How many times the generation loop has been traced in this process."""
    return _TRACE_COUNT


def clear_compiled_cache() -> None:
    """Drops every compiled generation executable (they hold device memory for their code only)."""
    _COMPILED.clear()


def _prefill_and_decode(state: nnx.State, ids_bt: jax.Array, mask_bt: jax.Array, key: jax.Array,
                        max_new: jax.Array, temperature: jax.Array, top_p: jax.Array, eos_e: jax.Array,
                        pad_id: jax.Array, *, graphdef: nnx.GraphDef, new_bucket: int, mode: SamplingMode):
    """Prefills `ids_bt` into a cache of size t + new_bucket, then decodes until all rows hit EOS or max_new."""
    global _TRACE_COUNT
    _TRACE_COUNT += 1
    model = nnx.merge(graphdef, state)
    b, t = ids_bt.shape

    def choose(logits_bv, step):
        return sample(logits_bv, jax.random.fold_in(key, step), temperature=temperature, top_p=top_p, mode=mode)

    cache = KVCache.zeros(model.config, b, t + new_bucket)
    out = model(ids_bt, attention_mask_bt=mask_bt, cache=cache)
    # Left padding: the last column holds every row's last prompt token.
    first_b = choose(out.logits_btv[:, -1], 0)
    tokens_bn = jnp.full((b, new_bucket), pad_id, jnp.int32).at[:, 0].set(first_b)
    done_b = jnp.isin(first_b, eos_e)
    num_tokens_b = jnp.ones((b,), jnp.int32)

    def keep_going(carry):
        step, _, _, _, done_b, _ = carry
        return (step < max_new) & ~jnp.all(done_b)

    def decode_one(carry):
        step, cache, last_b, tokens_bn, done_b, num_tokens_b = carry
        # Finished rows keep decoding (their output is discarded): one compiled step serves the whole batch.
        out = model(last_b[:, None], attention_mask_bt=jnp.ones((b, 1), bool), cache=cache)
        next_b = choose(out.logits_btv[:, -1], step)
        tokens_bn = jax.lax.dynamic_update_slice(tokens_bn, jnp.where(done_b, pad_id, next_b)[:, None], (0, step))
        num_tokens_b = num_tokens_b + (~done_b).astype(jnp.int32)
        done_b = done_b | jnp.isin(next_b, eos_e)
        return step + 1, out.cache, next_b, tokens_bn, done_b, num_tokens_b

    carry = (jnp.ones((), jnp.int32), out.cache, first_b, tokens_bn, done_b, num_tokens_b)
    steps, _, _, tokens_bn, done_b, num_tokens_b = jax.lax.while_loop(keep_going, decode_one, carry)
    return tokens_bn, num_tokens_b, done_b, steps


def _leaf_signature(state: nnx.State) -> tuple:
    return tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in jax.tree.leaves(state))


def _compiled_loop(graphdef: nnx.GraphDef, state: nnx.State, args: tuple, new_bucket: int, mode: SamplingMode):
    """The executable for these shapes, compiled on first use. Returns (executable, seconds spent compiling)."""
    cache_key = (graphdef, _leaf_signature(state), tuple((a.shape, str(a.dtype)) for a in args), new_bucket, mode)
    executable = _COMPILED.get(cache_key)
    if executable is not None:
        return executable, 0.0
    start = time.perf_counter()
    fn = jax.jit(_prefill_and_decode, static_argnames=("graphdef", "new_bucket", "mode"))
    executable = fn.lower(state, *args, graphdef=graphdef, new_bucket=new_bucket, mode=mode).compile()
    _COMPILED[cache_key] = executable
    return executable, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------------
# Token-level API.

def generate_ids_detailed(model: CausalLM, input_ids_bt: np.ndarray, attention_mask_bt: np.ndarray,
                          config: GenerationConfig, eos_ids: Sequence[int], pad_id: int) -> GenerationResult:
    """Continues left-padded prompts; see `generate_ids`. Also returns lengths, finish reasons and timings."""
    ids_bt = np.asarray(input_ids_bt)
    mask_bt = np.asarray(attention_mask_bt).astype(bool)
    if ids_bt.ndim != 2 or ids_bt.shape != mask_bt.shape:
        raise ValueError(f"input_ids_bt {ids_bt.shape} and attention_mask_bt {mask_bt.shape} must be equal 2-D shapes")
    b, t = ids_bt.shape
    if b == 0:
        raise ValueError("no prompts to generate from")
    if not mask_bt[:, -1].all():
        raise ValueError("prompts must be left padded: the last column of attention_mask_bt must be all ones, "
                         f"rows {np.flatnonzero(~mask_bt[:, -1]).tolist()} end in padding")
    vocab = model.config.vocab_size
    if ids_bt[mask_bt].size and (ids_bt[mask_bt].min() < 0 or ids_bt[mask_bt].max() >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}), got range [{ids_bt[mask_bt].min()}, "
                         f"{ids_bt[mask_bt].max()}]")

    # Pad to the buckets: extra prompt columns are left padding; extra rows copy row 0 and are dropped afterwards.
    # Padding slots hold token 0 (any valid id: they are masked), since `pad_id` may lie outside the vocabulary.
    b_bucket, t_bucket = bucket(b), bucket(t, MIN_PROMPT_BUCKET)
    new_bucket = bucket(config.max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    padded_ids_bt = np.zeros((b_bucket, t_bucket), np.int32)
    padded_mask_bt = np.zeros((b_bucket, t_bucket), bool)
    padded_ids_bt[:b, t_bucket - t:] = ids_bt
    padded_mask_bt[:b, t_bucket - t:] = mask_bt
    padded_ids_bt[b:], padded_mask_bt[b:] = padded_ids_bt[0], padded_mask_bt[0]
    padded_ids_bt[~padded_mask_bt] = 0

    eos = sorted({int(e) for e in eos_ids}) if config.stop_at_eos else []
    eos_e = np.full((bucket(len(eos)),), -1, np.int32)  # -1 is never sampled
    eos_e[:len(eos)] = eos
    key = np.asarray(jax.random.key_data(jax.random.key(config.seed)))
    args = (padded_ids_bt, padded_mask_bt, key, np.int32(config.max_new_tokens), np.float32(config.temperature),
            np.float32(config.top_p), eos_e, np.int32(pad_id))

    graphdef, state = nnx.split(model)
    executable, compile_s = _compiled_loop(graphdef, state, args, new_bucket, config.mode)
    start = time.perf_counter()
    tokens_bn, num_tokens_b, done_b, steps = jax.device_get(executable(state, *args))
    run_s = time.perf_counter() - start
    return GenerationResult(
        tokens_bn=np.asarray(tokens_bn[:b, :config.max_new_tokens]),
        num_tokens_b=np.asarray(num_tokens_b[:b]),
        finish_reasons=tuple("eos" if d else "length" for d in done_b[:b]),
        decode_steps=int(steps), compile_s=compile_s, run_s=run_s)


def generate_ids(model: CausalLM, input_ids_bt: np.ndarray, attention_mask_bt: np.ndarray, config: GenerationConfig,
                 eos_ids: Sequence[int], pad_id: int) -> np.ndarray:
    """New tokens (batch, max_new_tokens) for left-padded prompts; after a row's EOS (kept) the row holds `pad_id`."""
    return generate_ids_detailed(model, input_ids_bt, attention_mask_bt, config, eos_ids, pad_id).tokens_bn


# ----------------------------------------------------------------------------------------------------------------------
# Text-level API.

def _encode_prompts(tokenizer, prompts: Sequence[str | Messages], chat_template: bool | None) -> list[list[int]]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_template = has_template if chat_template is None else chat_template
    if use_template and not has_template:
        raise TokenizerError("chat_template=True but the tokenizer has no chat template; pass plain string prompts "
                             "with chat_template=False, or a tokenizer whose tokenizer_config.json has chat_template")
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            messages = list(prompt)
            if not use_template:
                raise TokenizerError(f"prompt {i} is a list of chat messages, but no chat template is applied; pass "
                                     "a plain string, or use a tokenizer with a chat template")
        else:
            raise TypeError(f"prompt {i} must be a string or a list of {{'role': ..., 'content': ...}} messages, "
                            f"got {type(prompt).__name__}")
        if use_template:
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except ImportError as e:  # transformers renders templates with jinja2, an optional dependency
                raise TokenizerError(f"cannot apply the tokenizer's chat template: {e} Or pass chat_template=False "
                                     "(--no-chat-template) to tokenize the prompts as they are.") from e
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise ConfigError(f"prompt {i} ({prompt!r}) is empty after tokenization; give at least one token")
        encoded.append(list(ids))
    return encoded


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids_bt, attention_mask_bt) with every sequence right-aligned (padding on the left)."""
    t = max(len(s) for s in sequences)
    ids_bt = np.full((len(sequences), t), pad_id, np.int32)
    mask_bt = np.zeros((len(sequences), t), bool)
    for row, seq in enumerate(sequences):
        if seq:
            ids_bt[row, t - len(seq):] = seq
            mask_bt[row, t - len(seq):] = True
    return ids_bt, mask_bt


def stop_and_pad_ids(model: CausalLM, tokenizer=None) -> tuple[tuple[int, ...], int]:
    """EOS ids (the model config's and the tokenizer's) and the pad id (config, tokenizer, first EOS, else 0)."""
    eos = list(model.config.eos_token_ids)
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    if tokenizer_eos is not None and tokenizer_eos not in eos:
        eos.append(int(tokenizer_eos))
    pad = model.config.pad_token_id
    if pad is None and tokenizer is not None:
        pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return tuple(eos), int(pad)


def generate_detailed(model: CausalLM, tokenizer, prompts: Sequence[str | Messages],
                      config: GenerationConfig = GenerationConfig(), *,
                      chat_template: bool | None = None) -> GenerationResult:
    """`generate`, returning the texts with token counts, finish reasons and timings."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        raise TypeError("prompts must be a list of prompts: wrap a single prompt (string or message list) in a list")
    if not prompts:
        raise ValueError("no prompts to generate from")
    eos_ids, pad_id = stop_and_pad_ids(model, tokenizer)
    sequences = _encode_prompts(tokenizer, prompts, chat_template)
    ids_bt, mask_bt = left_pad(sequences, pad_id)
    result = generate_ids_detailed(model, ids_bt, mask_bt, config, eos_ids, pad_id)
    texts = []
    for tokens_n, n, reason in zip(result.tokens_bn, result.num_tokens_b, result.finish_reasons):
        kept_n = tokens_n[:n - 1] if reason == "eos" else tokens_n[:n]
        texts.append(tokenizer.decode(kept_n.tolist(), skip_special_tokens=True))
    return dataclasses.replace(result, texts=tuple(texts),
                               prompt_tokens_b=np.asarray([len(s) for s in sequences]))


def generate(model: CausalLM, tokenizer, prompts: Sequence[str | Messages],
             config: GenerationConfig = GenerationConfig(), *, chat_template: bool | None = None) -> list[str]:
    """Continues each prompt (a string, or a list of chat messages) and returns the new text, EOS excluded.

    With `chat_template` None the tokenizer's chat template is applied when it has one (a string becomes one user
    message) with `add_generation_prompt=True`; False tokenizes strings as they are. Prompts are batched with left
    padding; generation stops per row at any EOS id of the model config or the tokenizer.
    """
    return list(generate_detailed(model, tokenizer, prompts, config, chat_template=chat_template).texts)
