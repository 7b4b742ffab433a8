import pytest
import torch

from forge.data import DEFAULT_CHARS, CharTokenizer


def test_round_trip_every_allowed_character():
    tok = CharTokenizer()
    text = DEFAULT_CHARS + " tom has 3, gets 4. total? (12*7)%97"
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert max(ids) < tok.vocab_size and min(ids) >= 0
    assert len(set(tok.encode(DEFAULT_CHARS))) == len(DEFAULT_CHARS)


def test_special_ids_distinct_and_first():
    tok = CharTokenizer()
    ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id]
    assert ids == [0, 1, 2, 3]
    assert tok.vocab_size == len(DEFAULT_CHARS) + 4


def test_literal_special_tokens_encode_as_one_id_and_decode():
    tok = CharTokenizer()
    ids = tok.encode("<bos>1+2<sep>3<eos>")
    assert ids == [tok.bos_id, *tok.encode("1+2"), tok.sep_id, tok.token_id("3"), tok.eos_id]
    assert tok.decode(ids) == "1+23"
    assert tok.decode(ids, skip_special=False) == "<bos>1+2<sep>3<eos>"
    assert tok.decode(torch.tensor(ids)) == "1+23"


def test_unknown_character_is_a_clear_error():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"Unknown character 'A' at position 2"):
        tok.encode("ab" + "A")
    with pytest.raises(ValueError, match="Unknown special token"):
        tok.encode("1<think>2")
    with pytest.raises(ValueError, match="Unknown token id"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError):
        tok.encode(3)


def test_add_special_tokens_appends_and_keeps_existing_ids():
    tok = CharTokenizer()
    before = {ch: tok.token_id(ch) for ch in DEFAULT_CHARS}
    size = tok.vocab_size
    ids = tok.add_special_tokens(["<think>", "</think>", "<think>"])
    assert ids == [size, size + 1, size]
    assert tok.vocab_size == size + 2
    assert {ch: tok.token_id(ch) for ch in DEFAULT_CHARS} == before
    assert tok.add_special_tokens(["<eos>"]) == [tok.eos_id]
    text = "<think>2+2</think>4"
    assert tok.encode(text) == [size, *tok.encode("2+2"), size + 1, tok.token_id("4")]
    assert tok.decode(tok.encode(text)) == "2+24"
    assert tok.decode(tok.encode(text), skip_special=False) == text


@pytest.mark.parametrize("bad", ["think", "<a b>", "<>", "<<x>>", 5])
def test_add_special_tokens_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="Invalid special token"):
        CharTokenizer().add_special_tokens([bad])


def test_to_dict_from_dict_exact_round_trip():
    tok = CharTokenizer()
    tok.add_special_tokens(["<think>", "</think>", "<step>"])
    d = tok.to_dict()
    back = CharTokenizer.from_dict(d)
    assert back == tok and back.to_dict() == d
    text = "<think>sort:321</think>123"
    assert back.encode(text) == tok.encode(text)
    assert back.vocab_size == tok.vocab_size


def test_constructor_and_from_dict_validation():
    with pytest.raises(ValueError, match="appear once"):
        CharTokenizer(chars="aab")
    with pytest.raises(ValueError, match="reserved"):
        CharTokenizer(chars="ab<")
    with pytest.raises(ValueError, match="must start with"):
        CharTokenizer(special=("<bos>", "<pad>", "<eos>", "<sep>"))
    with pytest.raises(ValueError, match="missing keys"):
        CharTokenizer.from_dict({"type": "char", "chars": "abc"})
    with pytest.raises(ValueError, match="Invalid tokenizer dict"):
        CharTokenizer.from_dict({"type": "bpe"})
