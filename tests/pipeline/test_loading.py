"""forge.load_model and `forge generate`: a registered model loads hash-verified and answers as the pipeline's
own generation does (calculator on for a model with the call tokens)."""
import subprocess
import sys

import pytest
import torch

import forge
from forge.data import CharTokenizer, make_examples
from forge.data.batching import prompt_ids
from forge.data.tools import add_tool_tokens, generate
from forge.nn import TransformerConfig, build_model
from forge.pipeline.loading import UnknownModelError
from forge.registry import ChecksumError, ModelRegistry, save_checkpoint


@pytest.fixture
def registered(tmp_path):
    """A small real model with the calculator's tokens, saved and registered as a pipeline phase would."""
    tokenizer = CharTokenizer()
    add_tool_tokens(tokenizer)
    torch.manual_seed(1)
    model = build_model(TransformerConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, max_len=32))
    path = tmp_path / "runs" / "s" / "model.safetensors"
    metadata = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict()}
    save_checkpoint(model.state_dict(), path, metadata)
    with ModelRegistry(tmp_path / "runs" / "registry.db") as registry:
        registry.create_session("s", {})
        model_id = registry.register_model("s", "baking", "baked", path, metadata, phase=6)
    return model.eval(), tokenizer, model_id, path


def test_a_loaded_model_answers_as_the_pipeline_generates(registered, tmp_path):
    model, tokenizer, model_id, path = registered
    loaded = forge.load_model(model_id, run_root=tmp_path / "runs")
    assert loaded.model_id == model_id and loaded.uses_calculator and loaded.tokenizer == tokenizer
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    by_path = forge.load_model(path)
    for example in make_examples({"addition": 1.0, "reversal": 1.0}, 6, "test", 0):
        (out,) = generate(model, [prompt_ids(example, tokenizer)], tokenizer, 32)
        assert loaded.generate(example.prompt) == tokenizer.decode(out.ids, skip_special=False)
        assert loaded.answer(example.prompt) == by_path.answer(example.prompt) == out.answer(tokenizer)
    with pytest.raises(ValueError, match="this model reads at most 32"):
        loaded.answer("1" * 40)


def test_load_model_refuses_changed_bytes_and_unknown_ids(registered, tmp_path):
    _, _, model_id, path = registered
    with pytest.raises(UnknownModelError, match="no model 'p6-nothing'"):
        forge.load_model("p6-nothing", run_root=tmp_path / "runs")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256"):
        forge.load_model(model_id, run_root=tmp_path / "runs")


def test_forge_generate_answers_from_the_shell(registered, tmp_path):
    _, _, model_id, _ = registered
    expected = forge.load_model(model_id, run_root=tmp_path / "runs").answer("12+7=")
    cmd = [sys.executable, "-P", "-m", "forge.cli", "generate", "--set", f"run_root={tmp_path / 'runs'}"]
    result = subprocess.run([*cmd, model_id, "12+7="], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    unknown = subprocess.run([*cmd, "p6-nothing", "1+1="], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "no model 'p6-nothing'" in unknown.stderr
