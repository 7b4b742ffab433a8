"""forge.nn.Transformer: the cache reproduces the full forward, generation is greedy, the parts match
their formulas, configs validate and round-trip, and the model learns."""
import pytest
import torch

from forge.nn import RMSNorm, Transformer, TransformerConfig, build_model
from forge.optim import MuonGrokfast, muon_param_groups


def small(**kw) -> Transformer:
    cfg = dict(vocab_size=23, dim=32, n_layers=2, n_heads=4, max_len=24)
    cfg.update(kw)
    return build_model(cfg).double().eval()


def test_cache_reproduces_full_forward():
    model = small()
    tokens = torch.randint(0, 23, (3, 17))
    full = model(tokens)
    logits, cache = model(tokens[:, :9], use_cache=True)
    parts = [logits]
    for t in range(9, 17):
        logits, cache = model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_shared_prefix_cache_broadcasts_over_batch():
    """One prompt prefix computed once (batch 1) and reused for a batch of different continuations."""
    model = small()
    prefix, rest = torch.randint(0, 23, (1, 6)), torch.randint(0, 23, (4, 7))
    _, cache = model(prefix, use_cache=True)
    cached = model(rest, past_key_values=cache)
    full = model(torch.cat([prefix.expand(4, -1), rest], 1))[:, 6:]
    torch.testing.assert_close(cached, full, rtol=1e-10, atol=1e-10)


def test_generate_is_greedy_and_stops():
    model = small()
    tokens = torch.randint(0, 23, (2, 5))
    out = model.generate(tokens, max_new_tokens=6)
    seq = tokens
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    stop = int(out[0, 5])
    stopped = model.generate(tokens, max_new_tokens=6, stop_token=stop)
    assert int(stopped[0, -1]) == stop and stopped.shape[1] <= out.shape[1]


def test_rms_norm_matches_formula():
    norm = RMSNorm(7, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 7)[:, ::2]  # non-contiguous
    x64 = x.double()
    expected = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_config_round_trip_and_parameter_count():
    cfg = TransformerConfig(vocab_size=40, dim=48, n_layers=3, n_heads=6, max_len=32)
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    model = Transformer(cfg)
    hidden = cfg.hidden
    per_block = 4 * 48 * 48 + 3 * 48 * hidden + 2 * 48
    assert hidden % 16 == 0 and hidden >= 8 * 48 // 3
    assert model.num_parameters() == 2 * 40 * 48 + 3 * per_block + 48
    tied = Transformer(TransformerConfig(vocab_size=40, dim=48, n_layers=3, n_heads=6, tie_embeddings=True))
    assert tied.num_parameters() == model.num_parameters() - 40 * 48


@pytest.mark.parametrize("bad, match", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(vocab_size=10, dim=30, n_heads=4), "n_heads"),
    (dict(vocab_size=10, dim=36, n_heads=4), "even"),
    (dict(vocab_size=10, norm_eps=0.0), "norm_eps"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TransformerConfig(**bad)


def test_bad_inputs():
    model = small()
    with pytest.raises(ValueError, match="unknown model config keys"):
        build_model(dict(vocab_size=10, depth=3))
    with pytest.raises(ValueError, match="int64"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_records_attention_max_logits():
    model = small()
    model(torch.randint(0, 23, (2, 8)))
    for block in model.blocks:
        assert torch.isfinite(block.attn.max_logits).all()


def test_learns_a_copy_task_with_muon_grokfast():
    torch.manual_seed(0)
    model = build_model(dict(vocab_size=12, dim=32, n_layers=2, n_heads=4, max_len=16))
    opt = MuonGrokfast(muon_param_groups(model), lr=0.02, adamw_lr=3e-3, grokfast=None)
    losses = []
    for _ in range(150):
        first = torch.randint(2, 12, (32, 6))
        tokens = torch.cat([first, torch.ones(32, 1, dtype=torch.long), first], 1)
        logits = model(tokens[:, :-1])[:, 6:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 12), tokens[:, 7:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0 and sum(losses[-10:]) / 10 < 0.3 * losses[0]


def _random_packing(lengths, width, seed):
    """Sequences of `lengths` placed end to end in rows of `width` (as forge.data.pack_batch lays them out), random
    tokens; returns tokens, positions, segments and per sequence (row, start)."""
    g = torch.Generator().manual_seed(seed)
    rows, where, room = [], [], []
    for i, n in enumerate(lengths):
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([]), room.append(width)
            r = len(rows) - 1
        where.append((r, width - room[r]))
        rows[r].append(i)
        room[r] -= n
    tokens = torch.randint(0, 23, (len(rows), width), generator=g)
    positions, segments = torch.zeros_like(tokens), torch.full_like(tokens, -1)
    for i, ((r, at), n) in enumerate(zip(where, lengths)):
        positions[r, at: at + n], segments[r, at: at + n] = torch.arange(n), i
    return tokens, positions, segments, where


@pytest.mark.parametrize("lengths,width", [([5, 9, 3, 17, 1, 11, 6], 24), ([24], 24), ([1, 1, 1], 3), ([7, 2], 13)])
def test_packed_rows_give_each_sequence_its_own_logits(lengths, width):
    model = small()
    tokens, positions, segments, where = _random_packing(lengths, width, seed=len(lengths))
    packed = model(tokens, positions=positions, segments=segments)
    for (r, at), n in zip(where, lengths):
        alone = model(tokens[r: r + 1, at: at + n])[0]
        torch.testing.assert_close(packed[r, at: at + n], alone, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(packed).all()        # padding rows attend to padding, never to nothing


def test_packed_gradients_equal_the_separate_sequences():
    model = small(n_layers=1)
    lengths = [6, 4, 9, 3]
    tokens, positions, segments, where = _random_packing(lengths, 12, seed=3)
    targets = torch.randint(0, 23, tokens.shape)
    targets[segments < 0] = -100
    loss = torch.nn.functional.cross_entropy(model(tokens, positions=positions, segments=segments).flatten(0, 1),
                                             targets.flatten(), ignore_index=-100, reduction="sum")
    packed = torch.autograd.grad(loss, list(model.parameters()))
    total = sum(torch.nn.functional.cross_entropy(model(tokens[r: r + 1, at: at + n])[0], targets[r, at: at + n],
                                                  reduction="sum") for (r, at), n in zip(where, lengths))
    for a, b in zip(packed, torch.autograd.grad(total, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)   # RMSNorm sums its weight gradients in float32


def test_packing_arguments_are_checked():
    model, tokens = small(), torch.randint(0, 23, (2, 5))
    with pytest.raises(ValueError, match="positions and segments go together"):
        model(tokens, positions=torch.zeros_like(tokens))
    with pytest.raises(ValueError, match="positions and segments go together"):
        model(tokens, positions=torch.zeros(2, 4, dtype=torch.long), segments=torch.zeros(2, 4, dtype=torch.long))
    _, cache = model(tokens[:, :2], use_cache=True)
    with pytest.raises(ValueError, match="packing and past_kv"):
        model(tokens[:, 2:], past_key_values=cache, positions=torch.zeros(2, 3, dtype=torch.long),
              segments=torch.zeros(2, 3, dtype=torch.long))
