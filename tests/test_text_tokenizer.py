import unicodedata

import numpy as np
import pytest

from dalle.config import TokenizerConfig
from dalle.runroot import TOKENIZER_DIR, TOKENIZER_FILE, TOKENIZER_META
from dalle.storage import Storage
from dalle.tokens.bpe import (
    PAD_ID,
    TextTokenizer,
    TokenizerError,
    load_tokenizer,
    save_tokenizer,
    tokenizer_for_run,
    train_bpe,
)

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
CAPTIONS = [
    f"A {size} {colour} {shape} above a {size2} {colour2} {shape2}"
    for size in ["small", "large"]
    for colour in COLOURS
    for shape in SHAPES
    for size2 in ["small", "large"]
    for colour2 in COLOURS[:2]
    for shape2 in SHAPES[:2]
]
CFG = TokenizerConfig(vocab_size=400, min_frequency=2)

HOSTILE = [
    "",
    "   ",
    "🙂🎨 a circle made of emoji 🟥🟦",
    "漢字のキャプション、赤い丸",
    "שלום עולם — מעגל אדום",
    "a\x00b\x07c\x1b[31m red\x7f",
    "\u202eright-to-left override\u200f",
    "e\u0301 combining accent, ǅ title case, İstanbul",
    "<pad> <pad>",
    "lone surrogate \ud800 here",
    "x" * 200_000,
    " " * 200_000 + "a red circle",
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CAPTIONS, CFG)


def assert_padded_rows(tokens: np.ndarray, vocab_size: int) -> None:
    """Every row is text ids in [1, vocab_size) followed only by PAD_ID."""
    for row in tokens:
        text_len = int(np.count_nonzero(row))
        assert (row[:text_len] > 0).all() and (row[text_len:] == PAD_ID).all()
        assert (row < vocab_size).all()


def test_round_trip_is_the_lower_cased_caption(bpe):
    captions = [
        "A Small RED Circle above a large blue STAR",
        "a purple triangle",
        "Numbers 123 and punctuation!?",
    ]
    tokens = bpe.encode_batch(captions, 64)
    assert [bpe.decode(row) for row in tokens] == [c.lower() for c in captions]
    assert bpe.decode(tokens[0].tolist()) == captions[0].lower()


def test_rows_are_truncated_and_right_padded_int32(bpe):
    tokens = bpe.encode_batch(["a red circle", "a small red circle above a large blue square " * 20], 12)
    assert tokens.shape == (2, 12) and tokens.dtype == np.int32
    assert 0 < np.count_nonzero(tokens[0]) < 12 and (tokens[0, -1] == PAD_ID)
    assert np.count_nonzero(tokens[1]) == 12
    longer = bpe.encode_batch(["a small red circle above a large blue square " * 20], 40)
    np.testing.assert_array_equal(tokens[1], longer[0, :12])
    assert bpe.encode_batch([], 7).shape == (0, 7)
    with pytest.raises(ValueError, match="at least 1"):
        bpe.encode_batch(["a"], 0)


def test_pad_id_is_never_text(bpe):
    tokens = bpe.encode_batch(CAPTIONS + HOSTILE, 48)
    assert_padded_rows(tokens, bpe.vocab_size)
    non_empty = [i for i, c in enumerate(CAPTIONS + HOSTILE) if c.strip()]
    assert all(tokens[i, 0] != PAD_ID for i in non_empty)


def test_vocab_size_is_the_trained_size(bpe):
    assert isinstance(bpe, TextTokenizer) and bpe.kind == "bpe"
    # 256 byte tokens + <pad> + merges; the small corpus may not fill the requested size.
    assert 257 < bpe.vocab_size <= CFG.vocab_size
    big = train_bpe(CAPTIONS, TokenizerConfig(vocab_size=10_000))
    assert big.vocab_size < 10_000
    assert big.encode_batch(CAPTIONS, 32).max() < big.vocab_size


def test_identity_is_stable_and_names_the_tokenizer(bpe):
    again = train_bpe(list(CAPTIONS), CFG)
    assert again.identity == bpe.identity and bpe.identity.startswith("bpe:")
    other = train_bpe(CAPTIONS + ["an orange hexagon next to an orange hexagon"] * 5, CFG)
    assert other.identity != bpe.identity
    not_lowered = train_bpe(CAPTIONS, CFG.model_copy(update={"lowercase": False}))
    assert not_lowered.identity != bpe.identity
    assert not_lowered.decode(not_lowered.encode_batch(["A Red Circle"], 16)[0]) == "A Red Circle"


def test_save_then_load_encodes_identically(bpe, run_root):
    storage = Storage(run_root)
    uri = save_tokenizer(bpe, storage)
    assert uri == storage.uri(TOKENIZER_DIR)
    meta = storage.read_json(TOKENIZER_META)
    assert meta["kind"] == "bpe" and meta["identity"] == bpe.identity and meta["vocab_size"] == bpe.vocab_size
    assert meta["lowercase"] is True and meta["config"]["vocab_size"] == CFG.vocab_size
    loaded = load_tokenizer(storage, CFG)
    assert loaded.identity == bpe.identity and loaded.vocab_size == bpe.vocab_size
    np.testing.assert_array_equal(
        loaded.encode_batch(CAPTIONS + HOSTILE, 32), bpe.encode_batch(CAPTIONS + HOSTILE, 32)
    )
    assert load_tokenizer(storage).identity == bpe.identity


@pytest.mark.parametrize(
    "change, key",
    [
        ({"vocab_size": 500}, "vocab_size"),
        ({"lowercase": False}, "lowercase"),
        ({"kind": "open_clip"}, "kind"),
    ],
)
def test_load_with_other_settings_names_the_key(bpe, tmp_path, change, key):
    storage = Storage(str(tmp_path))
    save_tokenizer(bpe, storage)
    with pytest.raises(TokenizerError, match=rf"tokenizer\.{key}=.*delete") as err:
        load_tokenizer(storage, CFG.model_copy(update=change))
    assert isinstance(err.value, ValueError) and storage.uri(TOKENIZER_DIR) in str(err.value)


def test_dropout_setting_alone_does_not_invalidate_a_saved_tokenizer(bpe, tmp_path):
    storage = Storage(str(tmp_path))
    save_tokenizer(bpe, storage)
    assert load_tokenizer(storage, CFG.model_copy(update={"bpe_dropout": 0.2})).identity == bpe.identity


def test_missing_tokenizer_says_what_to_run(tmp_path):
    storage = Storage(str(tmp_path))
    with pytest.raises(TokenizerError, match=r"no tokenizer under .*; run `dalle tokenize` first"):
        load_tokenizer(storage, CFG)


def test_damaged_tokenizer_is_a_clear_error(bpe, tmp_path):
    storage = Storage(str(tmp_path))
    save_tokenizer(bpe, storage)
    other = train_bpe(CAPTIONS[:40], CFG)
    storage.write_bytes(TOKENIZER_FILE, other.tokenizer_json.encode())
    with pytest.raises(TokenizerError, match="changed by hand"):
        load_tokenizer(storage, CFG)
    storage.delete(TOKENIZER_FILE)
    with pytest.raises(TokenizerError, match="is missing"):
        load_tokenizer(storage, CFG)


def test_dropout_varies_segmentation_but_not_text():
    tokenizer = train_bpe(CAPTIONS, CFG.model_copy(update={"bpe_dropout": 0.5}))
    caption = "a small red circle above a large blue square"
    plain = tokenizer.encode_batch([caption] * 32, 64)
    assert (plain == plain[0]).all()
    dropped = tokenizer.encode_batch([caption] * 32, 64, dropout=True)
    assert len({row.tobytes() for row in dropped}) > 1
    assert {tokenizer.decode(row) for row in dropped} == {caption}
    assert_padded_rows(dropped, tokenizer.vocab_size)
    # Dropout splits merges, so rows get longer, never shorter.
    assert np.count_nonzero(dropped, axis=1).min() >= np.count_nonzero(plain[0])


def test_dropout_flag_without_configured_dropout_is_deterministic(bpe):
    rows = bpe.encode_batch(["a small red circle above a large blue square"] * 8, 32, dropout=True)
    assert (rows == rows[0]).all()


def test_tokenizer_for_run_trains_once_then_loads(tmp_path):
    storage = Storage(str(tmp_path))
    calls = []

    def captions():
        calls.append(1)
        return iter(CAPTIONS)

    first = tokenizer_for_run(storage, CFG, captions)
    assert calls == [1] and storage.exists(TOKENIZER_FILE) and storage.exists(TOKENIZER_META)

    def must_not_be_read():
        raise AssertionError("the saved tokenizer must be reused, not retrained")

    again = tokenizer_for_run(storage, CFG, must_not_be_read)
    assert again.identity == first.identity
    with pytest.raises(TokenizerError, match="vocab_size"):
        tokenizer_for_run(storage, CFG.model_copy(update={"vocab_size": 999}), must_not_be_read)


def test_training_without_captions_is_a_clear_error():
    with pytest.raises(TokenizerError, match="no captions"):
        train_bpe(iter([]), CFG)


def test_hostile_captions_encode_and_decode(bpe):
    tokens = bpe.encode_batch(HOSTILE, 24)
    assert tokens.shape == (len(HOSTILE), 24)
    assert (tokens[0] == PAD_ID).all() and (tokens[1] == PAD_ID).all()
    assert np.count_nonzero(tokens[HOSTILE.index("x" * 200_000)]) == 24
    # Text the tokenizer keeps whole comes back as its normalised, lower-cased self.
    for i in (2, 3, 4, 5, 7):
        expected = unicodedata.normalize("NFC", HOSTILE[i]).strip().lower()
        assert bpe.decode(bpe.encode_batch([HOSTILE[i]], 256)[0]) == expected
    assert bpe.decode(tokens[8]) == "<pad> <pad>"
    assert bpe.decode(tokens[-1]) == "a red circle"
    assert bpe.encode_batch([None], 4).tolist() == [[0, 0, 0, 0]]
    with pytest.raises(TypeError, match="caption 1 is a int"):
        bpe.encode_batch(["ok", 5], 4)


def test_a_very_long_caption_keeps_its_first_tokens(bpe):
    words = ["a", "small", "red", "circle", "above", "a", "large", "blue", "square", "and", "green", "star"]
    start = " ".join(words * 3)
    long_caption = start + " " + " ".join(words * 20_000)
    np.testing.assert_array_equal(bpe.encode_batch([long_caption], 16), bpe.encode_batch([start], 16))


def test_open_clip_kind_works_offline(tmp_path):
    cfg = TokenizerConfig(kind="open_clip")
    storage = Storage(str(tmp_path))

    def must_not_be_read():
        raise AssertionError("open_clip needs no captions")

    tokenizer = tokenizer_for_run(storage, cfg, must_not_be_read)
    assert tokenizer.kind == "open_clip" and tokenizer.vocab_size == 49408
    assert tokenizer.identity.startswith("open_clip:")
    assert storage.exists(TOKENIZER_META) and not storage.exists(TOKENIZER_FILE)

    tokens = tokenizer.encode_batch(["A Red Circle", "wow!$ " + "word " * 100] + HOSTILE, 16)
    assert tokens.shape == (2 + len(HOSTILE), 16) and tokens.dtype == np.int32
    assert_padded_rows(tokens, 49408)
    start, end = tokens[0, 0], tokens[0, 4]
    assert tokenizer.decode(tokens[0]) == "a red circle"
    assert tokens[1, -1] == end  # a truncated row still ends with the end token
    assert tokens[2, :2].tolist() == [start, end]  # an empty caption is start, end, padding

    loaded = load_tokenizer(storage, cfg)
    assert loaded.identity == tokenizer.identity
    np.testing.assert_array_equal(loaded.encode_batch(HOSTILE, 16), tokens[2:])
