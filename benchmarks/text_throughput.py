"""Text preprocessing: captions/s on one core for raypipe's text pipeline beside a `str.split` floor.

    python benchmarks/text_throughput.py [--captions 100000] [--repeats 3] [--batch-size 256] [--seed 0]

Inputs: ``--captions`` COYO-like alt-text captions made here from ``--seed`` (no files, no network):
mixed case, punctuation, digits, prices and sizes, URLs, e-mail addresses, HTML tags and entities,
hashtags, emoji, ~8% non-English (Korean, Japanese, Chinese, Russian, Arabic, Greek, Hindi,
accented Latin), file-name and empty captions; 1-40 words (median ~12) and ~4% long ones
(40-300 words, product descriptions). Words follow a Zipf law over ~155k word forms (WordNet noun
and verb lemmas, their inflections and irregular forms, made-up names WordNet does not know),
shorter words more frequent, so the number of distinct words grows with the input as in a crawl.

Measured in this one process, single thread, no Ray, on the same captions:

1. floor: ``text.split()`` + dict lookup (a vocabulary of the split words) -> a list of ids padded or
   truncated to max_len, a plain loop.
2. pipeline: what ``PairPreparer`` (the prepare job's second pass) runs on each batch of
   ``--batch-size`` rows (``ray.batch_size``, a numpy object column): ``TextNormalizer`` with
   ``TextOptions()`` (clean, tokenize, WordNet lemmatize) per caption, then
   ``encode_tokens`` with a vocabulary counted on the pipeline's tokens (``VocabConfig()``'s
   min_freq / max_size).
   * cold: the first pass of a process (every per-process cache of raypipe.transforms.text
     emptied, as in a fresh Ray worker); the one-time setup (WordNet tables, Unicode patterns) is
     timed apart (``pipeline_setup_cpu_s``).
   * warm: the same captions again, caches filled.

Rates are captions per CPU second of this process, i.e. captions/s on one core: other work on a
shared machine slows them less than wall time (wall-time rates are recorded too). Each figure is
the best of ``--repeats`` passes. Ratio = pipeline / floor, target >= 0.3, judged on the cold pass
(every worker of a real cluster starts cold). Prints one summary line; everything goes to
benchmarks/results/text_throughput.json.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import itertools
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common` when run as a script

import numpy as np  # noqa: E402

from common import load_average, machine_info, rate, system_cpu_seconds, timed, write_results  # noqa: E402

TARGET_RATIO = 0.3


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

# The most frequent alt-text words, ranked first; the rest of the word pool follows by length.
COMMON_WORDS = (
    "the a of and in with for on to at by from is this an or new my your our best image photo black white "
    "set free how top one are it you can be not all more home design vector stock background woman man "
    "dog cat house car food girl boy beautiful old red blue green large small modern style vintage"
).split()
CONTRACTIONS = ["don't", "it's", "i'm", "can't", "you're", "we're", "that's", "won't"]
FOREIGN_PHRASES = [
    "아름다운 해변의 일몰 풍경", "맛있는 한국 음식 레시피", "신상품 여성 원피스 할인", "귀여운 강아지 사진",
    "東京の夜景と桜の写真", "かわいい猫のイラスト素材", "美丽的海滩日落风景", "高清壁纸下载",
    "Красивый закат на море", "Фото кошки на диване", "صورة جميلة للطبيعة", "منزل حديث للبيع",
    "Hermosa playa al atardecer", "Décoration de maison élégante", "Schöne Aussicht über München",
    "Cảnh đẹp Việt Nam mùa thu", "Ελληνικό νησί το καλοκαίρι", "हिन्दी समाचार आज की ताज़ा खबर",
]  # fmt: skip
EMOJI = ["😍", "❤️", "👍", "✨", "📸", "🔥", "😂", "🎉", "🌸", "👍🏽", "🇰🇷", "1️⃣"]
HOSTS = ["images.example.com", "cdn.shop-example.net", "i0.wp.example.com", "media.example.co.kr", "pbs.example.org"]
SYLLABLES = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"] + ["ch", "sh", "th", "x", "q"]
ZIPF_EXPONENT = 1.1


def word_pool(rng: random.Random) -> list[str]:
    """Word forms, most frequent first: COMMON_WORDS, then everything else, shorter ones earlier."""
    from raypipe.transforms.text import _tables

    wordnet = _tables()
    nouns = sorted(w for w in wordnet.lemmas["n"] if w.isalpha())
    verbs = sorted(w for w in wordnet.lemmas["v"] if w.isalpha())
    irregular = sorted(w for pos in ("n", "v") for w in wordnet.exceptions[pos] if w.isalpha())
    inflected = [n + "s" for n in nouns]
    for v in verbs:
        stem = v[:-1] if v.endswith("e") else v
        inflected += [v + "s", stem + "ing", stem + "ed"]
    made_up = ["".join(rng.choices(SYLLABLES, k=rng.randint(2, 4))) for _ in range(20_000)]
    words = sorted(set(nouns + verbs + irregular + inflected + made_up) - set(COMMON_WORDS))
    rank_keys = {w: len(w) + rng.expovariate(0.25) for w in words}  # drawn in sorted order: reproducible
    return COMMON_WORDS + sorted(words, key=rank_keys.__getitem__)


def noise_token(rng: random.Random) -> str:
    n = rng.randint(1, 99_999)
    return rng.choice([
        str(2000 + n % 24), f"{n % 100}%", f"${n % 500}.99", f"{n % 4000}x{n % 3000}", "-", "|", "&", "...",
        "!!!", f"#{n}", f"({n % 12 + 1}/12)", f"{n % 10}k", f"No.{n % 50}", f"SKU-{n}", rng.choice(CONTRACTIONS),
    ])  # fmt: skip


def fake_url(rng: random.Random) -> str:
    n = rng.randint(1000, 9_999_999)
    path = f"wp-content/uploads/{2010 + n % 14}/{n % 12 + 1:02d}/IMG_{n % 10000:04d}.jpg?w={n % 2000}"
    return f"https://{rng.choice(HOSTS)}/{path}"


def caption(rng: random.Random, draw_words) -> str:
    r = rng.random()
    if r < 0.01:
        return rng.choice(["", " ", "image", "&nbsp;", "<img>", "untitled"])
    if r < 0.03:
        n = rng.randint(0, 10**8)
        return rng.choice([f"IMG_{n % 10000:04d}.JPG", f"DSC{n % 100000:05d}", f"{n:08d}.png"])
    if r < 0.07:
        n = rng.randint(40, 300)  # product descriptions, article snippets
    else:
        n = min(40, max(1, round(rng.lognormvariate(math.log(12), 0.5))))
    words = []
    for w in draw_words(n):
        p = rng.random()
        if p < 0.06:
            words.append(noise_token(rng))
        elif p < 0.08:
            w += "'s"
        elif p < 0.14:
            w += rng.choice([",", ".", ":", "!", "?"])
        words.append(w)
    text = " ".join(words)
    case = rng.random()
    if case < 0.45:
        text = text[:1].upper() + text[1:]
    elif case < 0.70:
        text = text.title()
    elif case < 0.75:
        text = text.upper()
    if rng.random() < 0.08:
        phrase = rng.choice(FOREIGN_PHRASES)
        text = phrase if rng.random() < 0.5 else f"{text} - {phrase}"
    if rng.random() < 0.05:
        text = f"<b>{text}</b> &amp; {' '.join(draw_words(2))}<br/>&nbsp;&#8211; {rng.choice(HOSTS)}"
    if rng.random() < 0.04:
        text = f"{text} {fake_url(rng)}"
    if rng.random() < 0.01:
        text = f"{text} contact: {''.join(draw_words(1))}{rng.randint(1, 99)}@example.com"
    if rng.random() < 0.05:
        text += "".join(f" #{w}{v}" for w, v in zip(draw_words(3), draw_words(3)))
    if rng.random() < 0.06:
        text += " " + "".join(rng.choices(EMOJI, k=rng.randint(1, 3)))
    return text


def make_captions(count: int, seed: int) -> tuple[list[str], int]:
    """(captions, size of the word pool)."""
    rng = random.Random(seed)
    pool = word_pool(rng)
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in range(len(pool))))
    total = cum_weights[-1]

    def draw_words(k: int) -> list[str]:
        return [pool[bisect.bisect(cum_weights, rng.random() * total)] for _ in range(k)]

    return [caption(rng, draw_words) for _ in range(count)], len(pool)


# --------------------------------------------------------------------------------------------------
# The two loops
# --------------------------------------------------------------------------------------------------

def floor_pass(captions: list[str], token_to_id: dict[str, int], max_len: int) -> list[list[int]]:
    from raypipe.transforms.vocab import PAD_ID, UNK_ID

    get, padding = token_to_id.get, [PAD_ID] * max_len
    out = []
    for text in captions:
        ids = [get(w, UNK_ID) for w in text.split()[:max_len]]
        out.append(ids + padding[len(ids):])
    return out


def pipeline_pass(batches: list[np.ndarray], normalizer, token_to_id: dict[str, int], max_len: int) -> None:
    """The text part of PairPreparer.__call__, batch by batch."""
    from raypipe.transforms.text import encode_tokens

    for texts in batches:
        token_lists = [normalizer.tokens(t) for t in texts]
        encode_tokens(token_lists, token_to_id, max_len)


def empty_text_caches() -> None:
    """What a fresh worker process starts with: every functools cache of raypipe.transforms.text
    (per-word results, WordNet tables, compiled patterns) emptied."""
    import raypipe.transforms.text as text_module

    for obj in vars(text_module).values():
        if callable(getattr(obj, "cache_clear", None)):
            obj.cache_clear()


def word_caches() -> dict[str, dict]:
    """Hits, misses and size of the bounded per-word caches of raypipe.transforms.text."""
    import raypipe.transforms.text as text_module

    out = {}
    for name, obj in vars(text_module).items():
        info = getattr(obj, "cache_info", None)
        if callable(info) and info().maxsize is not None:
            out[name] = info()._asdict()
    return out


def measure(fn, count: int) -> dict:
    """One timed call of ``fn``: CPU and wall rates, and how many cores other processes used meanwhile."""
    gc.collect()
    sys0 = system_cpu_seconds()
    with timed() as t:
        fn()
    others = max(0.0, system_cpu_seconds() - sys0 - t.cpu_s) / t.wall_s
    return {
        "cpu_s": round(t.cpu_s, 3),
        "wall_s": round(t.wall_s, 3),
        "captions_per_cpu_s": rate(count, t.cpu_s),
        "captions_per_s": rate(count, t.wall_s),
        "others_cores_busy": round(others, 2),
    }


def best(runs: list[dict]) -> dict:
    top = max(runs, key=lambda r: r["captions_per_cpu_s"] or 0)
    return {**top, "runs_captions_per_cpu_s": [r["captions_per_cpu_s"] for r in runs]}


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", type=int, default=100_000, help="captions generated and processed (default 100000)")
    p.add_argument("--repeats", type=int, default=3, help="passes per figure, the best kept (default 3)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per pipeline batch (default: ray.batch_size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the caption generator")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from raypipe.config import RayConfig, VocabConfig
    from raypipe.transforms.text import TextOptions
    from raypipe.transforms.text import TextNormalizer, _patterns, _tables
    from raypipe.transforms.vocab import Vocabulary, count_tokens

    machine = machine_info(packages=("nltk", "numpy"))
    if machine["load_average_at_start"] and machine["load_average_at_start"][0] > 0.5:
        print(f"note: load average {machine['load_average_at_start']} at start; other work may skew the figures")
    batch_size = args.batch_size or RayConfig().batch_size
    text_options, vocab_config = TextOptions(), VocabConfig()
    max_len = text_options.max_len

    with timed() as t_gen:
        captions, pool_size = make_captions(args.captions, args.seed)
    print(f"{len(captions)} captions from a pool of {pool_size} word forms in {t_gen.wall_s:.1f}s", flush=True)
    column = np.empty(len(captions), dtype=object)  # Ray Data hands a text column over as an object array
    column[:] = captions
    batches = [column[i : i + batch_size] for i in range(0, len(column), batch_size)]

    normalizer = TextNormalizer(text_options)
    min_freq, max_size = vocab_config.min_freq, vocab_config.max_size
    split_vocab = Vocabulary.from_counts(count_tokens(c.split() for c in captions), min_freq, max_size)
    pipeline_tokens = [normalizer.tokens(c) for c in captions]
    pipeline_vocab = Vocabulary.from_counts(count_tokens(pipeline_tokens), min_freq, max_size)
    split_ids, pipeline_ids = split_vocab.token_to_id, pipeline_vocab.token_to_id
    inputs = {
        "captions": len(captions),
        "word_pool": pool_size,
        "mean_chars": round(sum(map(len, captions)) / len(captions), 1),
        "mean_split_words": round(sum(len(c.split()) for c in captions) / len(captions), 2),
        "mean_pipeline_tokens": round(sum(map(len, pipeline_tokens)) / len(captions), 2),
        "captions_without_tokens": sum(not t for t in pipeline_tokens),
        "distinct_split_words": len({w for c in captions for w in c.split()}),
        "distinct_pipeline_tokens": len({w for t in pipeline_tokens for w in t}),
        "split_vocab_size": len(split_vocab),
        "pipeline_vocab_size": len(pipeline_vocab),
        "examples": captions[:8],
    }
    del pipeline_tokens

    floor_runs = [measure(lambda: floor_pass(captions, split_ids, max_len), len(captions)) for _ in range(args.repeats)]
    floor = best(floor_runs)
    print(f"  floor (str.split + dict): {floor['captions_per_cpu_s']} captions/s per core", flush=True)

    setup_runs, cold_runs, warm_runs = [], [], []
    for _ in range(args.repeats):
        empty_text_caches()
        gc.collect()
        with timed() as t_setup:
            _tables(), _patterns()
        setup_runs.append(round(t_setup.cpu_s, 3))
        cold_runs.append(measure(lambda: pipeline_pass(batches, normalizer, pipeline_ids, max_len), len(captions)))
        caches_after_cold = word_caches()
        warm_runs.append(measure(lambda: pipeline_pass(batches, normalizer, pipeline_ids, max_len), len(captions)))
    cold, warm = best(cold_runs), best(warm_runs)
    setup_s = min(setup_runs)
    cold["captions_per_cpu_s_with_setup"] = rate(len(captions), cold["cpu_s"] + setup_s)
    print(f"  pipeline cold: {cold['captions_per_cpu_s']} captions/s per core (setup {setup_s}s apart), "
          f"warm: {warm['captions_per_cpu_s']}", flush=True)

    ratio_cold = round(cold["captions_per_cpu_s"] / floor["captions_per_cpu_s"], 3)
    ratio_warm = round(warm["captions_per_cpu_s"] / floor["captions_per_cpu_s"], 3)
    met = ratio_cold >= TARGET_RATIO
    busy = max(r["others_cores_busy"] for r in floor_runs + cold_runs + warm_runs)
    if busy > machine["cores"] - 1 + 0.2:  # one single-threaded loop only needs one free core
        print(f"note: other processes used up to {busy} cores meanwhile: the figures may be low")
    line = (
        f"text: floor {floor['captions_per_cpu_s']:.0f} captions/s/core, "
        f"pipeline cold {cold['captions_per_cpu_s']:.0f} (+{setup_s:.2f}s setup per process), "
        f"warm {warm['captions_per_cpu_s']:.0f}; ratio cold {ratio_cold:.2f}, warm {ratio_warm:.2f} "
        f"(target >= {TARGET_RATIO}: {'met' if met else 'missed'})"
    )
    results = {
        "summary": line,
        "params": {"captions": args.captions, "repeats": args.repeats, "batch_size": batch_size, "seed": args.seed,
                   "text_options": text_options.model_dump(), "vocab": vocab_config.model_dump(),
                   "zipf_exponent": ZIPF_EXPONENT},
        "inputs": inputs,
        "floor": floor,
        "pipeline_setup_cpu_s": setup_s,
        "pipeline_cold": cold,
        "pipeline_warm": warm,
        "word_caches_after_cold_pass": caches_after_cold,
        "ratio_cold": ratio_cold,
        "ratio_warm": ratio_warm,
        "target_ratio": TARGET_RATIO,
        "target_met": met,
        "others_cores_busy_max": busy,
        "load_average_at_end": load_average(),
        "machine": machine,
    }
    print(f"results: {write_results('text_throughput', results)}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
