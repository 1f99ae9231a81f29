import pytest
import tiktoken

from abcgpt.data.tokenizer import BPETokenizer, CharTokenizer, UnknownCharactersError, tokenizer_from_dict


def test_char_round_trip_over_all_sources():
    texts = ["hello world\n", "ROMEO: Wherefore art thou? ’é"]
    tok = CharTokenizer.from_texts(texts)
    assert tok.vocab_size == len(set("".join(texts)))
    for text in texts + ["".join(reversed(texts[1]))]:
        ids = tok.encode(text)
        assert len(ids) == len(text) and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text


def test_char_vocabulary_survives_a_checkpoint_dict():
    tok = CharTokenizer.from_texts(["abc\n", "xyz é"])
    again = tokenizer_from_dict(tok.to_dict())
    assert again.chars == tok.chars and again.encode("a é\n") == tok.encode("a é\n")


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_texts(["abc"])
    with pytest.raises(UnknownCharactersError, match=r"2 character.*'Z', 'é'"):
        tok.encode("abZcé")


def tiny_byte_level_encoding():
    """A small BPE vocabulary built here, so the wrapper is tested without downloading GPT-2's."""
    ranks = {bytes([b]): b for b in range(256)}
    for merge in (b"th", b"he", b"the", b" t"):
        ranks[merge] = len(ranks)
    return tiktoken.Encoding(name="tiny", pat_str=r"\s?\w+|\s?[^\w\s]+|\s+", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 260})


def test_bpe_round_trip_treats_special_tokens_as_text():
    tok = BPETokenizer("tiny", encoding=tiny_byte_level_encoding())
    text = "the theme<|endoftext|>then é"
    ids = tok.encode(text)
    assert 260 not in ids  # the separator in raw data is plain text, not a special token
    assert len(ids) < len(text.encode())  # merges were applied
    assert tok.decode(ids) == text
    assert tok.vocab_size == 261


def test_bpe_gpt2_round_trip_when_its_files_are_at_hand():
    try:
        tok = BPETokenizer("gpt2")
    except RuntimeError:
        pytest.skip("GPT-2 BPE files not cached and no network")
    assert tok.vocab_size == 50257
    assert tok.decode(tok.encode("Once upon a time, ROMEO spoke.")) == "Once upon a time, ROMEO spoke."


def test_unknown_tokenizer_kind_is_refused():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizer_from_dict({"kind": "wordpiece"})


def test_bpe_files_out_of_reach_name_the_offline_way(monkeypatch):
    def offline(name):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match=r"could not load the 'gpt2' BPE vocabulary .*TIKTOKEN_CACHE_DIR"):
        BPETokenizer("gpt2")
