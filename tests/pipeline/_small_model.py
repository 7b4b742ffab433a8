"""The small trained model the phase tests start from."""
import torch

from forge.data import CharTokenizer, make_examples
from forge.nn import TransformerConfig, build_model
from forge.optim import create_optimizer_from_phase
from forge.pipeline.training import train_on_examples


def small_trained_model(tasks: dict, *, examples: int, steps: int, max_len: int = 32, seed: int = 0):
    """(model in eval mode, tokenizer): a dim-64 two-layer Transformer trained `steps` steps (batch 32) on
    `examples` training examples of `tasks` with the phase-1 preset at lr 0.004."""
    tokenizer = CharTokenizer()
    torch.manual_seed(seed)
    model = build_model(TransformerConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4,
                                          max_len=max_len))
    optimizer = create_optimizer_from_phase(model, 1, lr=0.004, adamw_lr=0.004)
    train_on_examples(model, optimizer, make_examples(tasks, examples, "train", 0), tokenizer, steps=steps,
                      batch_size=32, max_len=max_len, seed=seed)
    return model.eval(), tokenizer
