import pytest
import torch
import torch.nn.functional as F

from forge.data import IGNORE_INDEX, TASKS, CharTokenizer, Example, encode_batch, make_examples


@pytest.fixture
def tok():
    return CharTokenizer()


def test_layout_and_shifted_targets(tok):
    examples = [Example("addition", "12+5", "17"), Example("copy", "copy:ab", "ab"), Example("x", "1", "")]
    batch = encode_batch(examples, tok, max_len=48)
    seqs = [[tok.bos_id, *tok.encode(e.prompt), tok.sep_id, *tok.encode(e.answer), tok.eos_id] for e in examples]
    width = max(map(len, seqs))
    assert batch.tokens.shape == batch.targets.shape == (3, width)
    assert batch.tokens.dtype == batch.targets.dtype == batch.prompt_lengths.dtype == torch.long
    for b, seq in enumerate(seqs):
        p = len(examples[b].prompt) + 2
        assert batch.prompt_lengths[b] == p
        assert batch.tokens[b, : len(seq)].tolist() == seq
        assert (batch.tokens[b, len(seq):] == tok.pad_id).all()
        expected = [IGNORE_INDEX] * width
        for t in range(p - 1, len(seq) - 1):   # <sep> .. last answer token predict answer + <eos>
            expected[t] = seq[t + 1]
        assert batch.targets[b].tolist() == expected
    # the empty answer still trains <eos> right after <sep>
    assert batch.targets[2].tolist().count(IGNORE_INDEX) == width - 1


def test_targets_are_next_tokens_on_random_examples(tok):
    examples = make_examples({name: 1 for name in TASKS}, 64, "train", seed=2)
    batch = encode_batch(examples, tok, max_len=48)
    mask = batch.targets != IGNORE_INDEX
    assert (batch.targets[:, :-1][mask[:, :-1]] == batch.tokens[:, 1:][mask[:, :-1]]).all()
    assert not mask[:, -1].any()
    n_answer = sum(len(e.answer) + 1 for e in examples)
    assert int(mask.sum()) == n_answer
    # decoding each row from prompt_lengths gives back the answer
    for b, e in enumerate(examples):
        p = int(batch.prompt_lengths[b])
        assert tok.decode(batch.tokens[b, p:]) == e.answer
        assert tok.decode(batch.tokens[b, 1 : p - 1]) == e.prompt


def test_loss_convention_matches_manual_shift(tok):
    examples = make_examples({"addition": 1, "reversal": 1}, 8, "val", seed=0)
    batch = encode_batch(examples, tok, max_len=48)
    logits = torch.randn(*batch.tokens.shape, tok.vocab_size, dtype=torch.float64)
    ours = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    total, count = 0.0, 0
    for b, e in enumerate(examples):
        p, n = int(batch.prompt_lengths[b]), len(e.answer) + 1
        for k in range(n):  # k-th answer token (or <eos>) is read off the logits one position earlier
            logp = torch.log_softmax(logits[b, p - 1 + k], -1)
            total -= logp[batch.tokens[b, p + k]].item()
            count += 1
    assert ours.item() == pytest.approx(total / count, rel=1e-12)


def test_errors(tok):
    with pytest.raises(ValueError, match=r"examples\[1\].*needs 13 tokens; max_len is 12"):
        encode_batch([Example("t", "1", "1"), Example("t", "12345", "12345")], tok, max_len=12)
    with pytest.raises(ValueError, match="empty"):
        encode_batch([], tok, max_len=12)
    with pytest.raises(ValueError, match="max_len"):
        encode_batch([Example("t", "1", "1")], tok, max_len=0)
    with pytest.raises(ValueError, match="Unknown character"):
        encode_batch([Example("t", "1", "A")], tok, max_len=12)


def test_to_device_keeps_values(tok):
    batch = encode_batch([Example("t", "1", "2")], tok, max_len=8)
    moved = batch.to("cpu")
    assert torch.equal(moved.tokens, batch.tokens) and torch.equal(moved.targets, batch.targets)


def test_pack_batch_holds_every_example_once_in_fewer_rows(tok):
    from forge.data import pack_batch
    examples = make_examples({name: 1 for name in TASKS}, 37, "train", seed=5)
    padded, packed = encode_batch(examples, tok, max_len=48), pack_batch(examples, tok, max_len=48)
    assert packed.tokens.shape[1] == padded.tokens.shape[1] and packed.tokens.shape[0] < len(examples)
    assert packed.count == len(examples)
    for i in range(len(examples)):
        at = packed.segments == i
        n = int((padded.tokens[i] != tok.pad_id).sum())
        assert int(at.sum()) == n                                   # one contiguous run in one row
        row = int(at.any(1).nonzero())
        cols = at[row].nonzero().flatten()
        assert cols.tolist() == list(range(int(cols[0]), int(cols[0]) + n))
        assert packed.tokens[row, cols].tolist() == padded.tokens[i, :n].tolist()
        assert packed.targets[row, cols].tolist() == padded.targets[i, :n].tolist()
        assert packed.positions[row, cols].tolist() == list(range(n))
    free = packed.segments == -1
    assert (packed.tokens[free] == tok.pad_id).all() and (packed.targets[free] == IGNORE_INDEX).all()
    assert int((packed.targets != IGNORE_INDEX).sum()) == int((padded.targets != IGNORE_INDEX).sum())
    again = pack_batch(examples, tok, max_len=48)
    assert torch.equal(again.tokens, packed.tokens) and torch.equal(again.segments, packed.segments)


def test_per_segment_all_reads_each_example_alone(tok):
    from forge.data import pack_batch, per_segment_all
    examples = [Example("copy", "copy:abc", "abc"), Example("copy", "copy:a", "a"), Example("x", "1", "")]
    packed = pack_batch(examples, tok, max_len=48)
    flags = torch.ones_like(packed.tokens, dtype=torch.bool)
    assert per_segment_all(flags, packed.segments, 3) == [True, True, True]
    flags[packed.segments == 1] = False
    flags[packed.segments == -1] = False      # padding never counts
    assert per_segment_all(flags, packed.segments, 3) == [True, False, True]
    assert per_segment_all(flags[:0], packed.segments[:0], 3) == [True, True, True]


def test_pack_batch_gives_a_row_each_below_min_rows(tok):
    from forge.data import pack_batch
    examples = [Example("copy", "copy:abcdefgh", "abcdefgh"), Example("copy", "copy:a", "a"), Example("x", "1", "")]
    assert pack_batch(examples, tok, max_len=48, min_rows=2).tokens.shape[0] == 2    # the two short ones share
    alone = pack_batch(examples, tok, max_len=48, min_rows=3)
    padded = encode_batch(examples, tok, max_len=48)
    assert torch.equal(alone.tokens, padded.tokens) and torch.equal(alone.targets, padded.targets)
    assert alone.segments.max(1).values.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="needs"):
        pack_batch([Example("copy", "copy:" + "a" * 30, "a" * 30)], tok, max_len=48)
