"""The small trained model the phase tests start from."""
import torch

from forge.data import CharTokenizer, make_examples
from forge.nn import TransformerConfig, build_model
from forge.optim import create_optimizer_from_phase
from forge.pipeline.training import train_on_examples

# Phases 1 and 2 at test size (--set values): three small models on reversal and sorting, then a short merge search
MODELS = ("[{name: rev, seed: 1, task_weights: {reversal: 3.0, sorting: 1.0}},"
          " {name: sort, seed: 2, task_weights: {sorting: 3.0, reversal: 1.0}},"
          " {name: mix, seed: 3, task_weights: {reversal: 1.0, sorting: 1.0}}]")
SMALL_PHASES_1_2 = (
    "phases.phase1.shared_steps=250", "phases.phase1.steps=40", "phases.phase1.eval_every=20",
    "phases.phase1.train_examples=3000", "phases.phase1.eval_examples=128", "phases.phase1.lr=0.004",
    "phases.phase1.branch_lr=0.0005", "phases.phase1.min_margin_over_baseline=0.1",
    "phases.phase1.model={dim: 64, n_layers: 2, n_heads: 4, max_len: 32}", f"phases.phase1.models={MODELS}",
    "phases.phase2.generations=2", "phases.phase2.population_size=6", "phases.phase2.eval_examples=96")


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
