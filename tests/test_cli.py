"""The `jaxmoelora` command line: generate from a saved model directory, and user errors as `error:` lines (status 2)."""

import json

import numpy as np
import pytest
from flax import nnx

from jaxmoelora.cli import build_parser, main
from jaxmoelora.generation import GenerationConfig, generate
from jaxmoelora.loading.pretrained import from_pretrained, hf_tensor_name, load_tokenizer
from jaxmoelora.models.config import ModelConfig
from jaxmoelora.models.decoder import init_model

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":", "hello", "world", "the", "sea", "is", "blue"]
VOCAB = 64
CHAT = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant : {% endif %}")


def save_tiny_model(directory, chat_template=CHAT):
    """A random tiny Llama in Hugging Face layout (config.json, model.safetensors, tokenizer files), without torch."""
    import transformers
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    hf_config.save_pretrained(directory)
    model = init_model(ModelConfig.from_hf(hf_config), seed=0)
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        path = tuple(str(p) for p in path)
        value = np.asarray(variable.get_value())
        per_layer = [(hf_tensor_name(path, i), v) for i, v in enumerate(value)] if path[0] == "layers" else [
            (hf_tensor_name(path, None), value)]
        for name, v in per_layer:
            tensors[name] = np.ascontiguousarray(v.T if path[-1] == "kernel" else v)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})

    vocab = {w: i for i, w in enumerate(WORDS)} | {f"w{i}": i for i in range(len(WORDS), VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize("chat_template", [True, False], ids=["chat-template", "no-chat-template"])
def test_generate_prints_each_prompt_and_its_continuation(model_dir, capsys, chat_template):
    if chat_template:
        pytest.importorskip("jinja2", reason="transformers needs jinja2 to render the chat template")
    prompts = ["hello world", "the sea is blue"]
    argv = ["generate", "--model", str(model_dir), "--prompt", prompts[0], "--prompt", prompts[1],
            "--max-new-tokens", "5"] + ([] if chat_template else ["--no-chat-template"])
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 0, err
    expected = generate(from_pretrained(model_dir), load_tokenizer(model_dir), prompts,
                        GenerationConfig(max_new_tokens=5), chat_template=chat_template)
    for i, (prompt, text) in enumerate(zip(prompts, expected), start=1):
        assert f"=== prompt {i} ===\n{prompt}\n" in out
        completion = out.split(f"=== completion {i} (")[1].split("===\n", 1)[1]
        assert completion.startswith(text + "\n")
    assert "tokens/s" in err and "loaded in" in err and "compiled in" in err


def test_generate_sampling_options_and_no_chat_template(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "4", "--temperature", "0.8",
            "--top-p", "0.9", "--seed", "3", "--no-chat-template", "--dtype", "bfloat16"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # the seed fixes the sample


def test_missing_model_path_is_an_error_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    status = main(["generate", "--model", str(missing), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err


def test_directory_without_config_is_an_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_invalid_generation_value_is_an_error(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_convert_with_a_missing_gguf_file_is_an_error(tmp_path, capsys):
    missing = tmp_path / "model.gguf"
    assert main(["convert", str(missing), str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_parser_lists_the_subcommands_and_rejects_unknown_ones(capsys):
    help_text = build_parser().format_help()
    assert "generate" in help_text and "convert" in help_text
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2


def test_subcommands_come_from_the_registry(monkeypatch, capsys):
    import jaxmoelora.cli as cli

    def add_hello_parser(subparsers):
        p = subparsers.add_parser("hello")
        p.add_argument("--name", default="world")
        p.set_defaults(run=lambda args: print(json.dumps({"hello": args.name})))

    monkeypatch.setattr(cli, "add_hello_parser", add_hello_parser, raising=False)
    monkeypatch.setattr(cli, "SUBCOMMANDS", cli.SUBCOMMANDS + ["jaxmoelora.cli:add_hello_parser"])
    assert main(["hello", "--name", "moe"]) == 0
    assert json.loads(capsys.readouterr().out) == {"hello": "moe"}
