"""The text branch, with the real NLTK and the real WordNet data (no mocks).

Needs WordNet installed: `bash scripts/install_wordnet.sh .venv/bin/python` (or `make nltk-data`).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from raypipe.transforms import text as T
from raypipe.transforms.stopwords import ENGLISH_STOPWORDS
from raypipe.transforms.text import (
    TextNormalizer,
    TextOptions,
    WordNetMissingError,
    clean_text,
    encode_tokens,
    ensure_wordnet,
    lemmatize_word,
)

COYO_CAPTION = "A woman swimming in the ocean at sunset, 2019 photo by John <b>Smith</b> https://x.com"


@pytest.fixture(scope="module")
def norm() -> TextNormalizer:
    return TextNormalizer(TextOptions())


# --- WordNet --------------------------------------------------------------------------------


def test_wordnet_is_installed():
    ensure_wordnet()  # raises WordNetMissingError with the install routes otherwise


@pytest.mark.parametrize(
    "word, lemma",
    [
        ("swim", "swim"),
        ("swam", "swim"),
        ("swimming", "swim"),
        ("swims", "swim"),
        ("mice", "mouse"),
        ("running", "run"),
        ("ran", "run"),
        ("dogs", "dog"),
        ("was", "be"),
        ("children", "child"),
        ("women", "woman"),
        ("churches", "church"),
        # A word that is itself a WordNet lemma stays (NLTK's lemmatize() picks the shortest
        # candidate: boss -> "bos", as -> "a", us -> "u").
        ("boss", "boss"),
        ("as", "as"),
        ("us", "us"),
        ("gas", "gas"),
        # Not in WordNet / not ASCII: unchanged.
        ("xyzzyq", "xyzzyq"),
        ("café", "café"),
        ("한국어", "한국어"),
    ],
)
def test_lemmatize_word(word, lemma):
    assert lemmatize_word(word) == lemma


def test_swim_forms_in_sentence(norm):
    assert norm.tokens("He swam, she swims; they were swimming.") == ["he", "swim", "she", "swim", "they", "be", "swim"]
    assert norm.tokens("Three MICE and two dogs") == ["three", "mouse", "and", "two", "dog"]


def test_morphy_agrees_with_nltk_wordnet():
    """Our table-based morphy gives exactly nltk.corpus.wordnet.morphy's answers (same files,
    same rules), on every exception form and a sample of regular inflections."""
    from nltk.corpus import wordnet as wn

    tables = T._tables()
    rng = random.Random(0)
    words = set()
    for pos in "nv":
        words.update(tables.exceptions[pos])
        lemmas = sorted(tables.lemmas[pos])
        for w in rng.sample(lemmas, 3000):
            words.update([w, w + "s", w + "es", w + "ed", w + "ing", w + "men", w + "ies"])
    words.update(["swam", "mice", "boss", "as", "us", "glasses", "leaves", "xyzzyq"])
    mismatches = [(w, pos) for w in sorted(words) for pos in "nv" if wn.morphy(w, pos) != tables.morphy(w, pos)]
    assert len(words) > 10_000
    assert mismatches == []


def test_nltk_lemmatizer_works_with_installed_data():
    """What scripts/install_wordnet.sh promises: NLTK's own lemmatizer finds the data."""
    from nltk.stem import WordNetLemmatizer

    lem = WordNetLemmatizer()
    assert lem.lemmatize("swam", "v") == "swim"
    assert lem.lemmatize("mice", "n") == "mouse"


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_missing_wordnet_error_names_both_routes(tmp_path):
    empty = tmp_path / "empty_nltk_data"
    empty.mkdir()
    proc = _run_python(
        f"""
        import json, nltk
        nltk.data.path[:] = [{str(empty)!r}]
        from raypipe.transforms.text import TextNormalizer, TextOptions, WordNetMissingError, ensure_wordnet
        out = {{}}
        try:
            ensure_wordnet()
        except WordNetMissingError as e:
            out["ensure"] = str(e)
        try:
            TextNormalizer(TextOptions())
        except WordNetMissingError as e:
            out["normalizer"] = str(e)
        # Without lemmatization no WordNet is needed.
        out["no_lemma"] = TextNormalizer(TextOptions(lemmatize=False)).tokens("Dogs swimming")
        print(json.dumps(out))
        """
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    msg = out["ensure"]
    assert "make nltk-data" in msg
    assert "scripts/install_wordnet.sh" in msg
    assert "nltk.downloader wordnet" in msg
    assert str(empty) in msg  # the directories searched
    assert "not found" in msg
    assert out["normalizer"] == msg
    assert out["no_lemma"] == ["dogs", "swimming"]


def test_missing_wordnet_error_pickles():
    err = WordNetMissingError("corpora/wordnet not found", searched=["/nowhere"])
    err2 = pickle.loads(pickle.dumps(err))
    assert type(err2) is WordNetMissingError and str(err2) == str(err) and err2.searched == ["/nowhere"]


def test_wordnet_zip_layout_of_the_nltk_downloader(tmp_path):
    """`nltk.downloader wordnet` may leave corpora/wordnet.zip: the lemmatizer reads that too."""
    import zipfile

    import nltk.data

    wn_dir = os.path.dirname(nltk.data.find("corpora/wordnet/lexnames").path)  # the installed one
    corpora = tmp_path / "nd" / "corpora"
    corpora.mkdir(parents=True)
    with zipfile.ZipFile(corpora / "wordnet.zip", "w", zipfile.ZIP_STORED) as zf:
        for name in T._WORDNET_FILES:
            zf.write(os.path.join(wn_dir, name), f"wordnet/{name}")
    proc = _run_python(
        f"""
        import json, nltk
        nltk.data.path[:] = [{str(tmp_path / "nd")!r}]
        from raypipe.transforms.text import TextNormalizer, _find_wordnet_file
        assert "wordnet.zip" in str(_find_wordnet_file("index.verb"))
        print(json.dumps(TextNormalizer().tokens("Three mice swam")))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["three", "mouse", "swim"]


def test_incomplete_wordnet_dir_is_reported(tmp_path):
    """A corpora/wordnet directory without lexnames (Debian's files copied, lexnames forgotten)."""
    wn_dir = tmp_path / "nd" / "corpora" / "wordnet"
    wn_dir.mkdir(parents=True)
    (wn_dir / "index.noun").write_text("dog n 1 0 1 0 02084071\n")
    proc = _run_python(
        f"""
        import nltk
        nltk.data.path[:] = [{str(tmp_path / "nd")!r}]
        from raypipe.transforms.text import WordNetMissingError, ensure_wordnet
        try:
            ensure_wordnet()
        except WordNetMissingError as e:
            print(e)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "lacks lexnames" in proc.stdout
    assert "index.noun" not in proc.stdout.split("lacks", 1)[1].split(")")[0]


# --- cleaning -------------------------------------------------------------------------------


def test_coyo_caption(norm):
    assert clean_text(COYO_CAPTION) == "a woman swimming in the ocean at sunset photo by john smith"
    assert norm.tokens(COYO_CAPTION) == [
        "a", "woman", "swim", "in", "the", "ocean", "at", "sunset", "photo", "by", "john", "smith",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("Hello, World!!! 123 (test) #tag ... 4.5% $9.99", "hello world test tag"),
        ("abc123def 2nd 3rd", "abc def nd rd"),
        ("visit https://example.com/a?b=1&c=2 or http://x.org now", "visit or now"),
        ("see www.Example.com/path today", "see today"),
        ("ftp://files.example.com/x.zip s3://bucket/key done", "done"),
        ("mail John.Smith+news@Example.co.uk please", "mail please"),
        ("<p class='x'>Hello <b>bold</b> <!-- note --> world</p><br/>", "hello bold world"),
        ("Tom &amp; Jerry &lt;3 &quot;cats&quot; caf&eacute; &#233;t&#xE9;", "tom jerry cats café été"),
        ("&lt;b&gt;escaped&lt;/b&gt; tags", "escaped tags"),
        ("don't it’s dog's", "dont its dogs"),
        ("well-known state-of-the-art", "well known state of the art"),
        ("snake_case_word", "snake case word"),
        ("soft\u00adhyphen zero\u200bwidth", "softhyphen zero width"),
        ("ＦＵＬＬ width ﬁsh", "full width fish"),
        ("x² ½ Ⅻ ① 🔟 ٣ ३", "x"),
        ("tab\tnew\nline\r\n  many   spaces  ", "tab new line many spaces"),
    ],
)
def test_clean_text(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_scripts_kept_and_emoji_removed(norm):
    text = "한국어 텍스트 😀🎉 Привет мир مرحبا بالعالم שלום עולם Ελληνικά naïve Ça hindi: हिन्दी भाषा 👍🏽❤️"
    assert clean_text(text) == (
        "한국어 텍스트 привет мир مرحبا بالعالم שלום עולם ελληνικά naïve ça hindi हिन्दी भाषा"
    )
    # Non-Latin words pass through the lemmatizer and the stemmer unchanged.
    stemmer = TextNormalizer(TextOptions(stem=True))
    for n in (norm, stemmer):
        toks = n.tokens(text)
        assert toks[:2] == ["한국어", "텍스트"]
        assert "مرحبا" in toks and "שלום" in toks and "हिन्दी" in toks and "naïve" in toks


def test_rtl_with_marks_and_digits():
    # Arabic with harakat (combining marks) stays one word; Arabic-Indic digits are removed.
    assert clean_text("مَرْحَبًا ١٢٣ عالم") == "مَرْحَبًا عالم"


def test_han_ideographs_are_single_tokens():
    assert clean_text("中文字符 日本語のテキスト") == "中 文 字 符 日 本 語 のテキスト"


def test_emoji_only_gives_no_tokens(norm):
    assert norm.tokens("😀🎉👍🏽❤️🇰🇷 1️⃣") == []


@pytest.mark.parametrize("text", [None, "", "   ", " \t\n\r ", "0123456789", "12 34.5 -6", "!!! ??? ...", "\x00\x00"])
def test_nothing_to_keep(norm, text):
    assert clean_text(text) == ""
    assert norm.tokens(text) == []


def test_nul_and_control_characters(norm):
    assert clean_text("dog\x00cat\x01bird\x7f\x1bfish") == "dog cat bird fish"
    assert norm.tokens("mice\x00running") == ["mouse", "run"]


def test_bytes_and_non_strings(norm):
    assert norm.tokens("Dogs".encode()) == ["dog"]
    assert norm.tokens(float("nan")) == []
    assert clean_text(b"caf\xc3\xa9") == "café"


# --- long texts -----------------------------------------------------------------------------


@pytest.fixture
def chars_cleaned(monkeypatch):
    """How many characters the normalizer hands to the cleaner: the cost of a text, without a clock."""
    seen = []
    words = T._words
    monkeypatch.setattr(T, "_words", lambda text, **kw: seen.append(len(text)) or words(text, **kw))
    return seen


def test_100kb_text_is_cut_early(norm, chars_cleaned):
    text = (COYO_CAPTION + " ") * (100_000 // len(COYO_CAPTION))
    assert len(text) >= 99_000
    assert norm.tokens(text)[:12] == norm.tokens(COYO_CAPTION)
    chars_cleaned.clear()
    toks = norm.tokens(text)
    assert len(toks) == norm.opts.max_len
    # Only a prefix is cleaned, and 100x more text cleans no more of it.
    assert sum(chars_cleaned) < 2 * norm._chunk
    cleaned = sum(chars_cleaned)
    chars_cleaned.clear()
    assert norm.tokens(text * 100) == toks
    assert sum(chars_cleaned) == cleaned


@pytest.mark.parametrize(
    "text",
    [
        "x" * 100_000,  # no spaces at all
        "é" * 100_000,
        "1234 !!! " * 12_000,  # nothing to keep: the whole text is read
        "<p class='a b c'>" * 6_000,
        "a@b.co " * 20_000,
        "https://x.com/" + "a" * 100_000,
    ],
)
def test_100kb_degenerate_texts(norm, text, chars_cleaned):
    toks = norm.tokens(text)
    assert len(toks) <= norm.opts.max_len
    assert all(len(t) <= T.MAX_TOKEN_CHARS for t in toks)
    # Prefixes growing x4 (together < 4/3 of the text), then at worst the whole text: linear cost.
    assert sum(chars_cleaned) <= 2.34 * len(text)


def _reference_tokens(n: TextNormalizer, text: str) -> list[str]:
    """The definition: normalize every word of the whole cleaned text, keep the first max_len."""
    o = n.opts
    words = [w for w in clean_text(text).split() if len(w) >= o.min_token_length]
    if o.remove_stopwords:
        words = [w for w in words if w not in ENGLISH_STOPWORDS]
    out = []
    for w in words:
        if o.lemmatize:
            w = lemmatize_word(w)
        if o.stem:
            w = T._stem(w)
        out.append(w)
    return out[: o.max_len]


def test_prefix_processing_equals_whole_text():
    rng = random.Random(1)
    pieces = [
        "dogs", "swimming", "mice", "<a href='http://x.com/a b'>link</a>", "&amp;", "2019", "john.doe@example.com",
        "https://example.com/path?q=1", "한국어", "don't", "x" * 70, "<b>", "</b>", "!!", "\n", "ééé", "running",
    ]  # fmt: skip
    for opts in (TextOptions(max_len=8), TextOptions(max_len=40, stem=True, min_token_length=2, remove_stopwords=True)):
        n = TextNormalizer(opts)
        for _ in range(150):
            k = rng.randint(50, 3000)
            text = "".join(rng.choice(pieces) + rng.choice([" ", "", "  ", "\t"]) for _ in range(k))
            assert n.tokens(text) == _reference_tokens(n, text)


@pytest.mark.parametrize(
    "text, expected",
    [
        # No whitespace near the first cut (512 characters for max_len=2): the cut falls inside
        # "elephant", which must not come out as "elep".
        ("1" * 300 + "dog" + "1" * 205 + "elephant" + "1" * 300, ["dog", "elephant"]),
        # The first cut (the first whitespace after 512) falls inside a tag: its attributes must
        # not come out as words.
        ("dog " + "1 " * 253 + "<a title='zebra lion'>fish and more", ["dog", "fish"]),
        ("dog " + "1 " * 253 + "&lt;a title='zebra lion'&gt;fish and more", ["dog", "fish"]),
    ],
)
def test_prefix_cut_edge_cases(text, expected):
    n = TextNormalizer(TextOptions(max_len=2))
    assert n._chunk == 512
    assert n.tokens(text) == _reference_tokens(n, text) == expected


def test_long_word_is_cut():
    assert clean_text("a" * 200) == "a" * T.MAX_TOKEN_CHARS


# --- options --------------------------------------------------------------------------------


def test_max_len_truncates(norm):
    text = " ".join(f"word{i} w" for i in range(100))  # "word" then digits removed
    assert len(norm.tokens(text)) == 32
    assert TextNormalizer(TextOptions(max_len=3)).tokens("one two three four five") == ["one", "two", "three"]


def test_stemming_changes_output():
    text = "running happiness studies"
    plain = TextNormalizer(TextOptions(lemmatize=False))
    stem = TextNormalizer(TextOptions(lemmatize=False, stem=True))
    lemma = TextNormalizer(TextOptions())
    lemma_stem = TextNormalizer(TextOptions(stem=True))
    assert plain.tokens(text) == ["running", "happiness", "studies"]
    assert stem.tokens(text) == ["run", "happi", "studi"]
    assert lemma.tokens(text) == ["run", "happiness", "study"]
    assert lemma_stem.tokens(text) == ["run", "happi", "studi"]


def test_stopwords_and_min_token_length():
    text = "A dog and a cat, I think, were in the garden with x"
    assert TextNormalizer(TextOptions(remove_stopwords=True)).tokens(text) == ["dog", "cat", "think", "garden", "x"]
    assert TextNormalizer(TextOptions(min_token_length=2)).tokens(text) == [
        "dog", "and", "cat", "think", "be", "in", "the", "garden", "with",
    ]  # fmt: skip
    # Contractions are matched without their apostrophe; content words are not stop words.
    assert TextNormalizer(TextOptions(remove_stopwords=True)).tokens("don't shell well") == ["shell", "well"]
    assert "dont" in ENGLISH_STOPWORDS and isinstance(ENGLISH_STOPWORDS, frozenset)


def test_options_validation_and_round_trip():
    with pytest.raises(ValueError, match=r"max_len\n  Input should be greater than or equal to 1"):
        TextOptions(max_len=0)
    with pytest.raises(ValueError, match=r"min_token_length\n  Input should be greater than or equal to 1"):
        TextOptions(min_token_length=0)
    with pytest.raises(ValueError, match=r"lowercase\n  Extra inputs are not permitted"):
        TextOptions.model_validate({"max_len": 8, "lowercase": True})
    opts = TextOptions(max_len=16, stem=True, remove_stopwords=True, min_token_length=2)
    assert TextOptions.model_validate(json.loads(json.dumps(opts.model_dump()))) == opts


def test_normalizer_pickles():
    n = TextNormalizer(TextOptions(max_len=5, stem=True))
    n2 = pickle.loads(pickle.dumps(n))
    assert n2 == n and n2.opts == n.opts
    assert n2.tokens(COYO_CAPTION) == n.tokens(COYO_CAPTION) == ["a", "woman", "swim", "in", "the"]
    # Small state: options only, no NLTK objects or caches.
    assert len(pickle.dumps(n)) < 500


def test_normalizer_unpickles_in_a_fresh_process():
    """What a Ray worker does: unpickle, then build the WordNet tables and patterns lazily."""
    payload = pickle.dumps(TextNormalizer(TextOptions(max_len=6)))
    proc = _run_python(
        f"""
        import pickle, json
        n = pickle.loads({payload!r})
        print(json.dumps(n.tokens({COYO_CAPTION!r})))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["a", "woman", "swim", "in", "the", "ocean"]


def test_tokens_batch(norm):
    assert norm.tokens_batch(["dogs", None, "", "mice ran"]) == [["dog"], [], [], ["mouse", "run"]]


# --- encoding -------------------------------------------------------------------------------


VOCAB = {"<pad>": 0, "<unk>": 1, "dog": 2, "swim": 3, "mouse": 4}


def test_encode_pads_and_marks_unknown():
    ids, lengths = encode_tokens([["dog", "swim"], ["mouse", "zebra", "dog"], []], VOCAB, max_len=4)
    assert ids.dtype == np.int32 and lengths.dtype == np.int32
    assert ids.shape == (3, 4) and lengths.shape == (3,)
    np.testing.assert_array_equal(ids, [[2, 3, 0, 0], [4, 1, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(lengths, [2, 3, 0])


def test_encode_truncates_and_caps_length():
    ids, lengths = encode_tokens([["dog"] * 10, ["swim", "zebra", "mouse"]], VOCAB, max_len=3)
    np.testing.assert_array_equal(ids, [[2, 2, 2], [3, 1, 4]])
    np.testing.assert_array_equal(lengths, [3, 3])


def test_encode_empty_batch():
    ids, lengths = encode_tokens([], VOCAB, max_len=5)
    assert ids.shape == (0, 5) and ids.dtype == np.int32
    assert lengths.shape == (0,) and lengths.dtype == np.int32


def test_encode_object_array_input(norm):
    """Ray Data hands columns over as numpy object arrays."""
    texts = np.array(["Dogs swimming", None, "Mice"], dtype=object)
    toks = np.empty(len(texts), dtype=object)
    toks[:] = norm.tokens_batch(texts)
    ids, lengths = encode_tokens(toks, VOCAB, max_len=3)
    np.testing.assert_array_equal(ids, [[2, 3, 0], [0, 0, 0], [4, 0, 0]])
    np.testing.assert_array_equal(lengths, [2, 0, 1])
