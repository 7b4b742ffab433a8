"""Load a model the pipeline made and ask it something: `forge.load_model` and `forge generate`.

    import forge
    model = forge.load_model("p6-baked-1a2b3c4d5e6f")      # a registry id, or a .safetensors path
    print(model.answer("12+7="))                           # '19'

A registry id is looked up in `<run_root>/registry.db` and its file checked against the registry's sha256 and
metadata record; a path is checked against its JSON sidecar. The model answers the way the pipeline evaluated
it: greedy, after `<bos> prompt <sep>`, with the calculator answering its calls when its vocabulary has the
call tokens (a Phase 6 model onwards); `answer` keeps the text after the last thought or call, without
special tokens (persona markers), `generate` returns everything it wrote.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from forge.data import CharTokenizer
from forge.data.tools import (
    CALL,
    CALL_ERROR,
    END_CALL,
    END_RESULT,
    ToolOutput,
    calculator_for,
    generate,
)
from forge.pipeline.models import build_from_metadata

_ANSWER_STARTS_AFTER = ("</think>", END_CALL, END_RESULT, CALL_ERROR)


class UnknownModelError(ValueError):
    """No registered model has this id (and it is not a checkpoint path)."""


@dataclass
class ForgeModel:
    """A loaded, hash-verified model with its tokenizer; `answer` and `generate` run it on a prompt."""
    model: nn.Module
    tokenizer: CharTokenizer
    metadata: dict
    path: Path
    sha256: str
    model_id: str | None = None

    @property
    def uses_calculator(self) -> bool:
        return CALL in self.tokenizer.special_tokens

    def _run(self, prompt: str, max_new_tokens: int | None) -> ToolOutput:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
        prefix = [self.tokenizer.bos_id, *self.tokenizer.encode(prompt), self.tokenizer.sep_id]
        max_len = self.model.config.max_len
        if len(prefix) >= max_len:
            raise ValueError(f"prompt {prompt!r} takes {len(prefix)} tokens with <bos> and <sep>; this model reads "
                             f"at most {max_len}")
        return generate(self.model, [prefix], self.tokenizer, max_len, tool=calculator_for(self.tokenizer),
                        max_new=max_new_tokens)[0]

    def generate(self, prompt: str, max_new_tokens: int | None = None) -> str:
        """Everything the model (and its calculator) wrote after the prompt, special tokens included."""
        out = self._run(prompt, max_new_tokens)
        return self.tokenizer.decode(out.ids, skip_special=False)

    def answer(self, prompt: str, max_new_tokens: int | None = None) -> str:
        """The answer: the text after the last thought or calculator call, without special tokens."""
        ids = self._run(prompt, max_new_tokens).ids
        ends = {self.tokenizer.token_id(t) for t in _ANSWER_STARTS_AFTER if t in self.tokenizer.special_tokens}
        last = max((i for i, tok in enumerate(ids) if tok in ends), default=-1)
        return self.tokenizer.decode(ids[last + 1:])


def load_model(model: str | Path, run_root: str | Path = "runs", registry_path: str | Path | None = None,
               device: str = "cpu") -> ForgeModel:
    """The model registered as `model` (an id, looked up in run_root/registry.db or `registry_path`), or the
    checkpoint at the path `model`; verified (ChecksumError when the bytes or metadata changed)."""
    from forge.registry.checkpoint import load_checkpoint

    path = Path(model)
    if path.suffix == ".safetensors" or path.is_file():
        state_dict, metadata = load_checkpoint(path)
        record = {"id": metadata.get("model_id"), "path": str(path), "sha256": _sidecar_sha(path)}
    else:
        record = _registered(str(model), Path(registry_path) if registry_path else Path(run_root) / "registry.db")
        state_dict, metadata = load_checkpoint(Path(record["path"]), expected_sha256=record["sha256"],
                                               expected_metadata=record["metadata"])
    if "tokenizer" not in metadata:
        raise ValueError(f"{record['path']}: its metadata has no tokenizer; it is not a pipeline model")
    network = build_from_metadata(metadata, state_dict)
    network.load_state_dict(state_dict, strict=True)
    return ForgeModel(network.to(device).eval(), CharTokenizer.from_dict(metadata["tokenizer"]), metadata,
                      Path(record["path"]), record["sha256"], record["id"])


def _registered(model_id: str, registry_path: Path) -> dict:
    from forge.registry import ModelRegistry

    if not registry_path.is_file():
        raise UnknownModelError(f"{model_id!r} is not a checkpoint file, and there is no registry at {registry_path} "
                                "to look it up in (pass run_root= or registry_path=)")
    with ModelRegistry(registry_path) as registry:
        record = registry.get_model(model_id)
    if record is None:
        raise UnknownModelError(f"no model {model_id!r} in {registry_path}; `forge models` lists them")
    return record


def _sidecar_sha(path: Path) -> str:
    from forge.registry.checkpoint import read_sidecar

    return (read_sidecar(path) or {}).get("sha256", "")
