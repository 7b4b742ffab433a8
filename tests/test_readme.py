"""Every Python snippet of README.md runs, as a new user would copy it, with only the small stand-ins it
names but does not make (a model, gradients, logits, a prompt): the snippets are read from README.md itself,
so the docs cannot drift from the code."""
import re
from pathlib import Path

import pytest
import torch

from forge.nn import TransformerConfig, build_model

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _model():
    torch.manual_seed(0)
    return build_model(TransformerConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, max_len=32))


def _stand_ins() -> dict:
    """The names the snippets use without defining them, each as small as will do."""
    model = _model()
    model(torch.randint(0, 40, (2, 8))).float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    data = [torch.randint(0, 40, (4, 8)) for _ in range(2)]
    return {
        "torch": torch, "model": model, "grads": grads, "num_steps": 3,
        "student_logits": torch.randn(2, 5, 40, requires_grad=True), "teacher_logits": torch.randn(2, 5, 40),
        "answer_tokens": torch.ones(2, 5, dtype=torch.bool), "x": torch.randint(0, 40, (2, 8)),
        "teacher_hidden": torch.randn(2, 8, 32), "data": data,
        "loss_fn": lambda m, batch: m(batch).float().logsumexp(-1).mean(),
        "w": torch.randn(128, 256), "prompt_ids": torch.randint(0, 40, (1, 4)),
        "inputs": torch.randint(0, 40, (64, 6)), "held_out": torch.randint(0, 40, (8, 6)),
    }


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 9


def _registered_model(root) -> str:
    """A small model saved and registered under root/runs as a pipeline phase would: its id."""
    from forge.data import CharTokenizer
    from forge.registry import ModelRegistry, save_checkpoint

    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    model = build_model(TransformerConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, max_len=32))
    metadata = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict()}
    path = root / "runs" / "s" / "final.safetensors"
    save_checkpoint(model.state_dict(), path, metadata)
    with ModelRegistry(root / "runs" / "registry.db") as registry:
        registry.create_session("s", {})
        return registry.register_model("s", "cognate", "final", path, metadata, phase=1)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_each_readme_snippet_runs(index, tmp_path, monkeypatch):
    code = SNIPPETS[index]
    extra = {}
    if "load_model(" in code:      # run_root="runs" as the README says, in a folder of its own
        monkeypatch.chdir(tmp_path)
        extra["model_id"] = _registered_model(tmp_path)
    if "PromptBaker(" in code:     # the README's 200 steps, here 3: what runs is the snippet, not the schedule
        code = code.replace("steps=200", "steps=3")
    if "x = " not in code and "ternary_linear(x" in code:
        code = code.replace("ternary_linear(x,", "ternary_linear(torch.randn(3, 256),")
    namespace = {**_stand_ins(), **extra}
    exec(compile(code, f"README.md snippet {index + 1}", "exec"), namespace)
