r"""The text branch: clean -> tokenize -> lemmatize (WordNet) / stem -> integer ids -> pad.

Pure per-batch code (no Ray, no torch), so Ray Data can run it in map tasks and the labeling job
preprocesses new captions exactly as training did.

* ``clean_text``: lowercase, HTML entities unescaped, HTML tags / URLs / e-mail addresses removed,
  Unicode NFKC, then only runs of letters are kept: digits, punctuation, symbols, emoji, control
  characters are dropped; letters of every script are kept (Korean, Arabic, Hebrew, Cyrillic,
  accented Latin). Apostrophes inside words are dropped ("don't" -> "dont", "dog's" -> "dogs").
  Han ideographs (Chinese, Japanese kanji) become one token each, as in BERT, because those
  scripts do not separate words with spaces.
* Tokenizer: a regex tokenizer, i.e. what NLTK's ``RegexpTokenizer(pattern)`` does
  (``findall`` of a *letter run*: ``[^\W\d_]`` plus combining marks inside a word), run with
  ``re`` directly. One pass both drops the remaining digits/punctuation/symbols and splits the
  words. Why not the others (measured on one core on an 85-character COYO-like caption): after cleaning
  there is no punctuation left for Treebank rules to work on, so ``TreebankWordTokenizer`` and
  ``word_tokenize(preserve_line=True)`` give the same tokens as a split at ~170-250 us per
  caption; NLTK 3.10's ``RegexpTokenizer`` wraps every match in a ReDoS wall-clock guard
  (~24 us); the compiled pattern takes ~1.3 us (``str.split``: ~0.7 us).
* Lemmatization: WordNet's morphy, POS 'v' first and 'n' if the verb form is unchanged
  (swam/swimming -> swim, mice -> mouse, running -> run, was -> be). Unlike
  ``WordNetLemmatizer.lemmatize`` (the *shortest* candidate: boss -> "bos", as -> "a",
  us -> "u"), ``morphy`` keeps a word that is itself a WordNet lemma (boss, as, us, gas).
  The morphy tables (index.noun/verb, noun.exc/verb.exc) are read directly from the NLTK WordNet
  data directory: the same files and rules as ``nltk.corpus.wordnet.morphy`` (the tests check
  they agree), without building NLTK's full ``WordNetCorpusReader``, which costs ~3-4 s and
  ~150 MB in every Ray worker process (NLTK 3.10 also re-reads index.sense twice to map
  WordNet 3.0 onto itself). Loading these tables takes ~0.1 s and ~20 MB.
* Stemming (optional, after lemmatization): Snowball English (Porter2).
* Per-word results are cached per process (bounded ``functools.lru_cache``), shared by every
  ``TextNormalizer`` in the process: WordNet lookups and stemming dominate the cost otherwise.
  Words that are not ASCII (Korean, accented Latin, ...) pass through unchanged (WordNet and the
  English stemmer only know ASCII English).
"""

from __future__ import annotations

import functools
import html
import re
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raypipe.errors import UserError
from raypipe.transforms.stopwords import ENGLISH_STOPWORDS
from raypipe.transforms.vocab import PAD_ID, UNK_ID

__all__ = [
    "TextOptions",
    "TextNormalizer",
    "WordNetMissingError",
    "ensure_wordnet",
    "clean_text",
    "encode_tokens",
    "lemmatize_word",
    "PAD_ID",
    "UNK_ID",
]


# ---------------------------------------------------------------------------------------------
# Options


class TextOptions(BaseModel):
    """How texts become token ids: the ``text`` section of the prepare and train configs as it is,
    stored in the model bundle so labeling preprocesses exactly as training did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_len: int = Field(32, ge=1, le=4096, description="Tokens kept per text; shorter texts are padded with 0.")
    lemmatize: bool = Field(True, description="WordNet lemmatization, verb then noun (swam -> swim, mice -> mouse).")
    stem: bool = Field(
        False, description="Snowball (Porter2) English stemming after lemmatization (the paper stems and lemmatizes)."
    )
    remove_stopwords: bool = Field(False, description="Drop English stop words (the project's own list).")
    min_token_length: int = Field(1, ge=1, description="Drop tokens shorter than this many characters.")


# ---------------------------------------------------------------------------------------------
# WordNet data

# The files NLTK's WordNetCorpusReader opens when it loads (so "installed" means the same for
# NLTK and for us); the lemmatizer itself reads index.noun/verb and noun.exc/verb.exc.
_WORDNET_FILES = (
    "lexnames",
    "index.noun",
    "index.verb",
    "index.adj",
    "index.adv",
    "data.noun",
    "data.verb",
    "data.adj",
    "data.adv",
    "noun.exc",
    "verb.exc",
    "adj.exc",
    "adv.exc",
    "index.sense",
)


class WordNetMissingError(UserError, RuntimeError):
    """NLTK's WordNet data is not installed where NLTK looks for it."""

    def __init__(self, detail: str, searched: Sequence[str] | None = None):
        self.detail = detail
        self.searched = list(searched) if searched is not None else _nltk_search_path()
        super().__init__(self._message())

    def __reduce__(self):  # pickles with its own arguments (Ray sends worker errors to the driver)
        return (type(self), (self.detail, self.searched))

    def _message(self) -> str:
        py = sys.executable or "python"
        dirs = "\n".join(f"    - {d}" for d in self.searched) or "    (none)"
        return (
            f"NLTK WordNet data is missing or incomplete ({self.detail}); the text pipeline "
            "needs it to lemmatize (TextOptions(lemmatize=True)).\n"
            "Install it with one of:\n"
            "  1. offline, from Debian packages (wordnet-base, wordnet-sense-index):\n"
            "       make nltk-data\n"
            f"     or bash scripts/install_wordnet.sh {py}\n"
            f"     (copies the data into {sys.prefix}/nltk_data, which NLTK searches by default)\n"
            "  2. with internet access, NLTK's downloader:\n"
            f"       {py} -m nltk.downloader wordnet\n"
            "     (or python -c \"import nltk; nltk.download('wordnet')\")\n"
            "or disable lemmatization with TextOptions(lemmatize=False).\n"
            "Directories searched (nltk.data.path; add one with the NLTK_DATA environment variable;\n"
            "NLTK >= 3.10 skips directories that are group- or world-writable):\n"
            f"{dirs}"
        )


def _nltk_search_path() -> list[str]:
    try:
        import nltk.data

        return [str(p) for p in nltk.data.path]
    except Exception:  # pragma: no cover - nltk itself missing
        return []


def _find_wordnet_file(name: str):
    """NLTK path pointer for corpora/wordnet/<name> (directory or wordnet.zip), or None."""
    import nltk.data

    for resource in (f"corpora/wordnet/{name}", f"corpora/wordnet.zip/wordnet/{name}"):
        try:
            return nltk.data.find(resource)
        except LookupError:
            continue
    return None


_wordnet_ok = False


def ensure_wordnet() -> None:
    """Find NLTK's WordNet data or raise :class:`WordNetMissingError` (with both install routes).

    One cheap probe (a few stat calls, ~1-2 ms), cached for the process once it succeeds; a
    failure is not cached, so installing the data and calling again works.
    """
    global _wordnet_ok
    if _wordnet_ok:
        return
    try:
        import nltk.data  # noqa: F401
    except ImportError as e:  # pragma: no cover - nltk is a hard dependency
        raise WordNetMissingError(f"nltk is not importable: {e}", searched=[]) from e
    missing = [name for name in _WORDNET_FILES if _find_wordnet_file(name) is None]
    if missing:
        if len(missing) == len(_WORDNET_FILES):
            detail = "corpora/wordnet not found"
        else:
            detail = "corpora/wordnet lacks " + ", ".join(missing)
        raise WordNetMissingError(detail)
    _wordnet_ok = True


class _Morphy:
    """WordNet's morphy for nouns and verbs, exactly as ``WordNetCorpusReader.morphy``:
    exception list, else one application of the suffix rules; the first of [word, *candidates]
    that is a lemma of that part of speech, else None."""

    RULES = {
        "n": (
            ("s", ""),
            ("ses", "s"),
            ("ves", "f"),
            ("xes", "x"),
            ("zes", "z"),
            ("ches", "ch"),
            ("shes", "sh"),
            ("men", "man"),
            ("ies", "y"),
        ),
        "v": (
            ("s", ""),
            ("ies", "y"),
            ("es", "e"),
            ("es", ""),
            ("ed", "e"),
            ("ed", ""),
            ("ing", "e"),
            ("ing", ""),
        ),
    }

    def __init__(self) -> None:
        ensure_wordnet()
        self.lemmas = {pos: self._read_index(f"index.{name}") for pos, name in (("n", "noun"), ("v", "verb"))}
        self.exceptions = {pos: self._read_exc(f"{name}.exc") for pos, name in (("n", "noun"), ("v", "verb"))}

    @staticmethod
    def _read(name: str) -> str:
        pointer = _find_wordnet_file(name)
        if pointer is None:
            raise WordNetMissingError(f"corpora/wordnet/{name} not found")
        with pointer.open() as f:
            return f.read().decode("utf-8")

    @classmethod
    def _read_index(cls, name: str) -> frozenset[str]:
        # Lines starting with a space are the license header; the first field is the lemma.
        return frozenset(line.split(" ", 1)[0] for line in cls._read(name).splitlines() if line and line[0] != " ")

    @classmethod
    def _read_exc(cls, name: str) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        for line in cls._read(name).splitlines():
            terms = line.split()
            if terms:
                out[terms[0]] = tuple(terms[1:])
        return out

    def morphy(self, word: str, pos: str) -> str | None:
        lemmas = self.lemmas[pos]
        if word in lemmas:  # [word] + candidates: the word itself comes first
            return word
        exc = self.exceptions[pos].get(word)
        if exc is not None:
            candidates: Iterable[str] = exc
        else:
            candidates = (word[: -len(old)] + new for old, new in self.RULES[pos] if word.endswith(old))
        for c in candidates:
            if c in lemmas:
                return c
        return None


@functools.cache
def _tables() -> _Morphy:
    """Loaded once per process, on first use."""
    return _Morphy()


_CACHE_SIZE = 1 << 17  # distinct words per process; ~25 MB when full


@functools.lru_cache(maxsize=_CACHE_SIZE)
def lemmatize_word(word: str) -> str:
    """WordNet lemma of a lowercase word: POS 'v' first, 'n' if that leaves it unchanged.
    Non-ASCII words pass through."""
    if not word.isascii():
        return word
    t = _tables()
    lemma = t.morphy(word, "v")
    if lemma is not None and lemma != word:
        return lemma
    return t.morphy(word, "n") or word


_stemmer = None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _stem(word: str) -> str:
    global _stemmer
    if not word.isascii():
        return word
    if _stemmer is None:
        from nltk.stem.snowball import SnowballStemmer

        _stemmer = SnowballStemmer("english")
    return _stemmer.stem(word)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _lemma_stem(word: str) -> str:
    return _stem(lemmatize_word(word))


# ---------------------------------------------------------------------------------------------
# Cleaning + tokenizing

# Longer words are cut to this many characters (hashes, base64 blobs, unspaced scripts): keeps
# the vocabulary sane and lets a long text without spaces stop early.
MAX_TOKEN_CHARS = 64


def _char_class(codepoints: list[int]) -> str:
    """A regex character-class body for a sorted list of code points (merged into ranges)."""
    parts = []
    start = prev = codepoints[0]
    for cp in codepoints[1:] + [-1]:
        if cp == prev + 1:
            prev = cp
            continue
        parts.append(re.escape(chr(start)) if start == prev else f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
        start = prev = cp
    return "".join(parts)


class _Patterns:
    """Compiled once per process, on first use (~0.1 s: a scan of the Unicode categories)."""

    def __init__(self) -> None:
        marks: list[int] = []
        table: dict[int, str | None] = {}
        category = unicodedata.category
        for cp in range(0x110000):
            cat = category(chr(cp))
            if cat[0] == "M":
                if cp < 0x10000:
                    marks.append(cp)
            elif cat == "Cf":
                table[cp] = None  # soft hyphen, BOM, word joiner, bidi controls: deleted
            elif cat in ("No", "Nl"):
                table[cp] = " "  # ², ½, Ⅻ, ①: numbers, which `[^\W\d_]` would keep as letters
        # Keep the zero-width (non-)joiners that Persian/Indic words contain; the zero-width
        # space separates words.
        del table[0x200C], table[0x200D]
        table[0x200B] = " "
        # Non-ASCII text only: format characters and non-decimal numbers.
        self.translate_table = table
        # A word: a letter (`[^\W\d_]`: any script, no digits, no underscore), then letters or
        # combining marks (the BMP ones: Devanagari vowel signs, Arabic harakat, ...; a mark
        # class that also held the supplementary planes would be a linear range list and make
        # the whole regex 2-3x slower), with apostrophes and zero-width joiners allowed between
        # letters. Tokenizing = findall of this pattern, i.e. what NLTK's
        # RegexpTokenizer(word_pattern) does, without the ReDoS wall-clock guard NLTK 3.10 wraps
        # around every match (6x slower here; this pattern cannot backtrack catastrophically).
        letter = r"[^\W\d_]"
        joiner = "'\u2019\u200c\u200d"
        self.word_pattern = rf"{letter}(?:{letter}|[{_char_class(marks)}]|[{joiner}](?={letter}))*"
        self.tokenize = re.compile(self.word_pattern).findall
        # Pure-ASCII text (most captions) takes a simpler, faster pattern with the same result.
        self.tokenize_ascii = re.compile(r"[a-z]+(?:'[a-z]+)*").findall
        # Han ideographs (Chinese, Japanese kanji) are one token each, as in BERT.
        self.han = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]")
        # Markup, each only tried when its marker is in the text. The look-behinds make a match
        # start only at the beginning of a run, so the scans stay linear on texts without spaces.
        self.url = re.compile(r"(?<![a-z0-9+.\-])(?:[a-z][a-z0-9+.\-]*://|www\.)\S*")
        self.email = re.compile(r"(?<![\w.+\-])[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")
        self.tag = re.compile(r"<[a-z!/?][^<>]*>")  # tags, comments, doctype, processing instr.
        self.apostrophes = str.maketrans("", "", "'\u2019")


@functools.cache
def _patterns() -> _Patterns:
    return _Patterns()


def _words(text: str, truncated: bool = False) -> list[str]:
    """Clean ``text`` and split it into words (lowercase, letters only, apostrophes removed)."""
    p = _patterns()
    if "&" in text:
        text = html.unescape(text)
    ascii_only = text.isascii()
    if not ascii_only:
        text = unicodedata.normalize("NFKC", text.translate(p.translate_table))
        ascii_only = text.isascii()
    text = text.lower()
    if "<" in text:
        if truncated:
            # The text was cut: drop a tag left open by the cut instead of keeping its attributes.
            lt = text.rfind("<")
            if lt > text.rfind(">"):
                text = text[:lt]
        text = p.tag.sub(" ", text)
    if "://" in text or "www." in text:
        text = p.url.sub(" ", text)
    if "@" in text:
        text = p.email.sub(" ", text)
    if ascii_only:
        words = p.tokenize_ascii(text)
    else:
        text = p.han.sub(r" \g<0> ", text)
        words = p.tokenize(text)
    if "'" in text or "\u2019" in text:
        table = p.apostrophes
        words = [w.translate(table) if ("'" in w or "\u2019" in w) else w for w in words]
    if words and max(map(len, words)) > MAX_TOKEN_CHARS:
        words = [w[:MAX_TOKEN_CHARS] for w in words]
    return words


def clean_text(text: str | None) -> str:
    """The cleaned text: lowercase words of letters only, separated by single spaces.

    ``None``, empty and non-string input give ``""``.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not text or not isinstance(text, str):
        return ""
    return " ".join(_words(text))


_WS = re.compile(r"\s")


def _cut(text: str, limit: int) -> tuple[str, bool]:
    """A prefix of about ``limit`` characters that ends at whitespace; (prefix, last_word_partial)."""
    m = _WS.search(text, limit, limit + 256)
    if m is not None:
        return text[: m.start()], False
    back = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit))
    if back > 0:
        return text[:back], False
    return text[:limit], True


class TextNormalizer:
    """clean -> tokenize -> lemmatize/stem -> at most ``opts.max_len`` tokens.

    Picklable (Ray ships it to workers): the state is the options only; the WordNet tables,
    patterns and caches are per process, built on first use.

    Long texts are processed by prefix: the first ``max(512, 24 * max_len)`` characters, then
    4x more while fewer than ``max_len`` tokens came out, so a 100 KB text costs about as much as
    a long caption. The result equals processing the whole text.
    """

    def __init__(self, opts: TextOptions | None = None):
        self.opts = opts if opts is not None else TextOptions()
        if self.opts.lemmatize:
            ensure_wordnet()  # fail fast where the normalizer is built (driver)
        self._setup()

    def _setup(self) -> None:
        o = self.opts
        self._max_len = o.max_len
        self._min_len = o.min_token_length
        self._stop = ENGLISH_STOPWORDS if o.remove_stopwords else None
        self._chunk = max(512, 24 * o.max_len)
        if o.lemmatize and o.stem:
            self._word_fn = _lemma_stem
        elif o.lemmatize:
            self._word_fn = lemmatize_word
        elif o.stem:
            self._word_fn = _stem
        else:
            self._word_fn = None

    def __getstate__(self) -> dict:
        return {"opts": self.opts}

    def __setstate__(self, state: dict) -> None:
        self.opts = state["opts"]
        self._setup()

    def __repr__(self) -> str:
        return f"TextNormalizer({self.opts!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextNormalizer) and other.opts == self.opts

    def __hash__(self) -> int:
        return hash(self.opts)

    def _finish(self, words: list[str]) -> list[str]:
        n = self._max_len
        if self._min_len > 1 or self._stop is not None:
            min_len, stop = self._min_len, self._stop
            kept = []
            for w in words:
                if len(w) >= min_len and (stop is None or w not in stop):
                    kept.append(w)
                    if len(kept) >= n:
                        break
            words = kept
        elif len(words) > n:
            words = words[:n]
        fn = self._word_fn
        return list(map(fn, words)) if fn is not None else words

    def tokens(self, text: str | None) -> list[str]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if not text or not isinstance(text, str):
            return []
        limit = self._chunk
        while True:
            if len(text) <= limit:
                return self._finish(_words(text))
            prefix, partial = _cut(text, limit)
            words = _words(prefix, truncated=True)
            if partial and words and len(words[-1]) < MAX_TOKEN_CHARS:
                words.pop()  # the cut may have split the last word (a longer one is cut anyway)
            out = self._finish(words)
            if len(out) >= self._max_len:
                return out
            limit *= 4

    def tokens_batch(self, texts: Iterable[str | None]) -> list[list[str]]:
        tokens = self.tokens
        return [tokens(t) for t in texts]


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_tokens(
    token_lists: Sequence[Sequence[str]], token_to_id: Mapping[str, int], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Integer-encode and pad.

    Returns ``ids`` int32 [N, max_len] (0 = padding, 1 = unknown token) and ``lengths`` int32 [N]
    (real token count, capped at ``max_len``).
    """
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    n = len(token_lists)
    lengths = np.fromiter((min(len(t), max_len) for t in token_lists), dtype=np.int32, count=n)
    ids = np.full((n, max_len), PAD_ID, dtype=np.int32)
    total = int(lengths.sum())
    if total:
        get = token_to_id.get
        flat = np.fromiter(
            (get(tok, UNK_ID) for toks in token_lists for tok in toks[:max_len]), dtype=np.int32, count=total
        )
        # Row-major boolean mask: fills each row's first lengths[i] slots, in order.
        ids[np.arange(max_len) < lengths[:, None]] = flat
    return ids, lengths
