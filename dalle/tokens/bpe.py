"""The text tokenizer: a byte-level BPE trained on the run's captions, or open_clip's fixed one.

Every tokenizer here pads with id 0 and never produces 0 for text, so the transformer can
replace 0 by its per-position padding tokens. A run trains (or picks) its tokenizer once and
keeps it under the storage folder `TOKENIZER_DIR`: `tokenizer.json` (bpe only) and
`tokenizer_meta.json`, written last, which marks the tokenizer as complete. Token shards
record `identity`, so shards made by another tokenizer are never mixed silently.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from dalle.config import TokenizerConfig, with_changes
from dalle.errors import UserError
from dalle.runroot import TOKENIZER_DIR, TOKENIZER_FILE, TOKENIZER_META
from dalle.storage import Storage

PAD_ID = 0  # padding id of every tokenizer we produce; the transformer replaces 0 by per-position pad tokens


PAD_TOKEN = "<pad>"
OPEN_CLIP_VOCAB_SIZE = 49408
OPEN_CLIP_NAME = "bpe_simple_vocab_16e6"  # the vocabulary file of open_clip's SimpleTokenizer

# Settings that change which tokens a trained tokenizer produces; bpe_dropout only acts while training.
_BPE_KEYS = ("kind", "vocab_size", "min_frequency", "lowercase")
_OPEN_CLIP_KEYS = ("kind",)

# Only ASCII whitespace is whitespace to Python, to the BPE pre-tokenizer and to CLIP's alike,
# so a caption cut just before one keeps every earlier word exactly as it was.
_ASCII_SPACE = re.compile(r"[ \t\n\r\x0b\x0c]")


class TokenizerError(UserError, ValueError):
    """A saved tokenizer that is missing, damaged or disagrees with the config; the message says what to do."""


class TextTokenizer:
    """Captions to fixed-length rows of int32 token ids, right-padded with PAD_ID, and back."""

    kind: str
    vocab_size: int
    identity: str
    config: TokenizerConfig

    def encode_batch(self, captions: Sequence[str], length: int, dropout: bool = False) -> np.ndarray:
        """(N, length) int32 token ids, truncated to `length` and right-padded with PAD_ID."""
        if length < 1:
            raise ValueError(f"token length must be at least 1, got {length}")
        texts = [_clean_caption(caption, index) for index, caption in enumerate(captions)]
        rows = self._encode(texts, length, dropout) if texts else []
        out = np.zeros((len(texts), length), dtype=np.int32)
        for i, ids in enumerate(rows):
            ids = ids[:length]
            out[i, : len(ids)] = ids
        return out

    def decode(self, tokens: Any) -> str:
        """The text of one row of token ids, padding ignored (for galleries and debugging)."""
        ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        return self._decode([int(i) for i in ids if 0 < int(i) < self.vocab_size])

    def _encode(self, texts: list[str], length: int, dropout: bool) -> list[list[int]]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(identity={self.identity!r}, vocab_size={self.vocab_size})"


class BpeTokenizer(TextTokenizer):
    """Byte-level BPE (Hugging Face `tokenizers`): any text encodes, no unknown tokens.

    With `dropout=True` and `config.bpe_dropout > 0` merges are skipped at random while encoding
    (BPE dropout). That randomness comes from `tokenizers` itself and cannot be seeded, so such
    encodings are not reproducible; without dropout encoding is deterministic.
    """

    kind = "bpe"

    def __init__(self, tokenizer_json: str, config: TokenizerConfig):
        from tokenizers import Tokenizer

        self.tokenizer_json = tokenizer_json
        self.config = config
        self.identity = "bpe:" + hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.encode_special_tokens = True  # a caption saying "<pad>" is text, not padding
        self.vocab_size = self._tokenizer.get_vocab_size()
        if self._tokenizer.token_to_id(PAD_TOKEN) != PAD_ID:
            raise TokenizerError(
                f"this BPE tokenizer does not have {PAD_TOKEN} as id {PAD_ID}; train a new one"
            )
        vocab = self._tokenizer.get_vocab()
        # Byte-level tokens spell one character per byte.
        self._max_token_bytes = max(len(token) for token in vocab if token != PAD_TOKEN)
        self._dropout_tokenizer = None
        if config.bpe_dropout > 0:
            spec = json.loads(tokenizer_json)
            spec["model"]["dropout"] = config.bpe_dropout
            self._dropout_tokenizer = Tokenizer.from_str(json.dumps(spec))
            self._dropout_tokenizer.encode_special_tokens = True

    def _encode(self, texts: list[str], length: int, dropout: bool) -> list[list[int]]:
        tokenizer = (
            self._dropout_tokenizer if dropout and self._dropout_tokenizer is not None else self._tokenizer
        )
        # A token spans at most _max_token_bytes bytes and a character is at least one byte
        # (after NFC about a third of one at worst), so `length` tokens lie well inside this.
        budget = 4 * length * self._max_token_bytes + 64
        texts = [_cut(text, budget) for text in texts]
        return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        # The pre-tokenizer put one space before the (stripped) caption.
        return text.removeprefix(" ")


class OpenClipTokenizer(TextTokenizer):
    """open_clip's SimpleTokenizer (CLIP's BPE, 49,408 tokens) with its start and end tokens.

    It always lower-cases and cleans text its own way, whatever `config.lowercase` says, and
    has no BPE dropout.
    """

    kind = "open_clip"

    def __init__(self, config: TokenizerConfig | None = None):
        from open_clip.tokenizer import SimpleTokenizer

        self.config = config if config is not None else TokenizerConfig(kind="open_clip")
        self._tokenizer = SimpleTokenizer()
        self.vocab_size = len(self._tokenizer.encoder)
        self.identity = f"open_clip:{OPEN_CLIP_NAME}"
        self._start = self._tokenizer.sot_token_id
        self._end = self._tokenizer.eot_token_id
        # CLIP's vocabulary gives id 0 to "!" inside a word ("!$"); "!" as a word end keeps the text.
        self._bang = self._tokenizer.encoder["!</w>"]
        self._budget_per_token = max(len(token) for token in self._tokenizer.encoder)

    def _encode(self, texts: list[str], length: int, dropout: bool) -> list[list[int]]:
        budget = 4 * length * self._budget_per_token + 64
        rows = []
        for text in texts:
            ids = [self._start] + self._tokenizer.encode(_cut(text, budget)) + [self._end]
            ids = [self._bang if i == PAD_ID else i for i in ids]
            if len(ids) > length:
                # Like open_clip: a truncated row still ends with the end token.
                ids = ids[:length]
                ids[-1] = self._end
            rows.append(ids)
        return rows

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode([i for i in ids if i not in (self._start, self._end)])
        return text.strip()


def _clean_caption(caption: Any, index: int) -> str:
    """A caption the Rust tokenizer accepts: None is empty, lone surrogates become '?'."""
    if caption is None:
        return ""
    if not isinstance(caption, str):
        raise TypeError(f"caption {index} is a {type(caption).__name__}, not a str")
    if not caption.isascii():
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:
            caption = caption.encode("utf-8", "replace").decode("utf-8")
    return caption


def _cut(text: str, budget: int) -> str:
    """`text` shortened at a word boundary past `budget` characters of content, so a megabyte caption
    costs no more to encode than a short one while its first tokens stay the same."""
    if len(text) <= 2 * budget:
        return text
    start = len(text) - len(text.lstrip())
    limit = start + budget
    if len(text) <= limit:
        return text
    # Cut before a whitespace run that follows a non-space character: no word spans the cut.
    for match in _ASCII_SPACE.finditer(text, limit, limit + budget):
        if not text[match.start() - 1].isspace():
            return text[: match.start()]
    return text[: limit + budget]


def _bpe_training_text(captions: Iterable[str], seen: list[int]) -> Iterator[str]:
    for index, caption in enumerate(captions):
        if caption is None:
            continue
        seen[0] += 1
        yield _clean_caption(caption, index)


def train_bpe(captions: Iterable[str], cfg: TokenizerConfig) -> BpeTokenizer:
    """Train a byte-level BPE on `captions`; the same captions always give the same identity."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    steps = [normalizers.NFC(), normalizers.Strip()]
    if cfg.lowercase:
        steps.append(normalizers.Lowercase())
    tokenizer.normalizer = normalizers.Sequence(steps)
    # A space before the first word makes "red" at the start the same token as " red" inside.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[PAD_TOKEN],  # first, so it gets PAD_ID
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = [0]
    tokenizer.train_from_iterator(_bpe_training_text(captions, seen), trainer)
    if seen[0] == 0:
        raise TokenizerError(
            "no captions to train the BPE tokenizer on; curate some image-caption pairs first"
        )
    return BpeTokenizer(tokenizer.to_str(), cfg)


def open_clip_tokenizer(cfg: TokenizerConfig | None = None) -> OpenClipTokenizer:
    """open_clip's tokenizer; needs no network."""
    return OpenClipTokenizer(cfg)


def save_tokenizer(tokenizer: TextTokenizer, storage: Storage) -> str:
    """Write the tokenizer under the storage's TOKENIZER_DIR folder (meta last); returns the folder URI."""
    if isinstance(tokenizer, BpeTokenizer):
        storage.write_bytes(TOKENIZER_FILE, tokenizer.tokenizer_json.encode())
    meta = {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "identity": tokenizer.identity,
        "lowercase": tokenizer.config.lowercase if tokenizer.kind == "bpe" else True,
        "config": tokenizer.config.model_dump(mode="json"),
    }
    storage.write_json(TOKENIZER_META, meta)
    return storage.uri(TOKENIZER_DIR)


def load_tokenizer(storage: Storage, cfg: TokenizerConfig | None = None) -> TextTokenizer:
    """The tokenizer saved in this run; with `cfg`, fails when it was built with other settings."""
    folder = storage.uri(TOKENIZER_DIR)
    if not storage.exists(TOKENIZER_META):
        raise TokenizerError(f"no tokenizer under {folder}; run `dalle tokenize` first")
    meta = storage.read_json(TOKENIZER_META)
    saved = TokenizerConfig(**meta.get("config", {"kind": meta["kind"]}))
    if cfg is not None:
        keys = _BPE_KEYS if saved.kind == "bpe" or cfg.kind == "bpe" else _OPEN_CLIP_KEYS
        for key in keys:
            have, want = getattr(saved, key), getattr(cfg, key)
            if have != want:
                raise TokenizerError(
                    f"the tokenizer under {folder} was built with tokenizer.{key}={have!r}, "
                    f"but the config says {want!r}; set tokenizer.{key}: {json.dumps(have)} to keep using it, "
                    f"or delete {folder} (and the token shards made with it) to build a new one"
                )
        # Dropout only changes training-time encodings: the config in hand wins.
        saved = with_changes(saved, f"{folder}", bpe_dropout=cfg.bpe_dropout)
    if saved.kind == "open_clip":
        tokenizer: TextTokenizer = OpenClipTokenizer(saved)
    else:
        if not storage.exists(TOKENIZER_FILE):
            raise TokenizerError(
                f"{storage.uri(TOKENIZER_FILE)} is missing though its meta file exists; "
                f"delete {folder} and run `dalle tokenize` again"
            )
        tokenizer = BpeTokenizer(storage.read_bytes(TOKENIZER_FILE).decode("utf-8"), saved)
    if tokenizer.identity != meta.get("identity"):
        raise TokenizerError(
            f"the tokenizer under {folder} is {tokenizer.identity}, but its meta file says "
            f"{meta.get('identity')}; the folder was changed by hand: delete it and run `dalle tokenize` again"
        )
    return tokenizer


def tokenizer_for_run(
    storage: Storage, cfg: TokenizerConfig, captions: Callable[[], Iterable[str]]
) -> TextTokenizer:
    """The run's tokenizer: the saved one when there is one, else built (BPE trained on `captions()`) and saved."""
    if storage.exists(TOKENIZER_META):
        return load_tokenizer(storage, cfg)
    tokenizer = train_bpe(captions(), cfg) if cfg.kind == "bpe" else OpenClipTokenizer(cfg)
    save_tokenizer(tokenizer, storage)
    return tokenizer
