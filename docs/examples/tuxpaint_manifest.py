"""Build a manifest of labeled image-text pairs from the Tux Paint stamps (a real, small, GPL-2 set).

    apt-get install -y --no-install-recommends tuxpaint-stamps-default     # once, about 160 MB
    python docs/examples/tuxpaint_manifest.py --output /tmp/tuxpaint/manifest.csv
    python jobs/ingest.py manifest=/tmp/tuxpaint/manifest.csv key_column=key output=/tmp/tuxpaint/shards

Each stamp under /usr/share/tuxpaint/stamps/<category>/.../<name>.png|.svg has a <name>.txt whose
first line is its English description; the other lines are translations (``ko.utf8=...``). One
manifest row per stamp:

    key     the stamp's path under stamps/ without extension (animals/birds/duck): stable ids, so the
            key-hash train/validation/test split does not move when the package changes order
    image   absolute path of the picture; a stamp shipped both as PNG and SVG is one stamp (the PNG
            is used: no rasterizer needed)
    text    the English description (first line of <name>.txt)
    label   the top-level folder (animals, food, town ...); categories with fewer than
            --min-per-category stamps (default 20) are left out
    language  "en" (and the language code of augmented rows, see below)

Left out and reported: pictures without a description (``*_mirror`` variants Tux Paint shows when a
stamp is flipped), descriptions without a picture, and byte-identical pictures that ship twice (the
first path in sorted order is kept).

Text augmentation (off by default): ``--augment-languages de,fr,ko`` adds, for each stamp in the
*training* split, one row per language with the translated description and the same picture. This
is augmentation, not a different data set: validation and test keep only the original English rows, so
their figures stay comparable. Which stamps are in training is computed with raypipe's own
key-hash split (``--val-fraction`` / ``--test-fraction`` / ``--salt`` must match prepare's split settings,
default 0.1 / 0.1 / raypipe), and each augmented row gets a key (``<key>#<lang>``, with ``~N`` appended when needed)
that hashes into the training split too.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from raypipe.transforms.split import TRAIN, SplitRule, assign_split

STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
INSTALL_HINT = "apt-get install -y --no-install-recommends tuxpaint-stamps-default"
PICTURE_SUFFIXES = (".png", ".svg")  # in order of preference


def description(txt: Path) -> tuple[str, dict[str, str]]:
    """(English description, {language: translation}) from a stamp's .txt file."""
    lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    english = lines[0].strip() if lines else ""
    translations = {}
    for line in lines[1:]:
        lang, sep, text = line.partition("=")
        if sep and lang.endswith(".utf8") and text.strip():
            translations[lang.removesuffix(".utf8")] = text.strip()
    return english, translations


def find_stamps(root: Path) -> tuple[list[dict], Counter]:
    """Every stamp with a picture and a description, deduplicated; and what was left out, by reason."""
    skipped: Counter = Counter()
    stamps, seen_bytes = [], {}
    descriptions = {p.with_suffix(""): p for p in root.rglob("*.txt")}
    pictures: dict[Path, Path] = {}
    for suffix in reversed(PICTURE_SUFFIXES):  # the preferred suffix is written last and wins
        for picture in root.rglob(f"*{suffix}"):
            stem = picture.with_suffix("")
            if stem in pictures:
                skipped["same stamp as PNG and SVG (PNG kept)"] += 1
            pictures[stem] = picture
    for stem in sorted(set(pictures) - set(descriptions)):
        skipped["picture without description (e.g. *_mirror)"] += 1
    for stem in sorted(set(descriptions) - set(pictures)):
        skipped["description without picture"] += 1
    for stem in sorted(set(pictures) & set(descriptions)):
        picture = pictures[stem]
        digest = hashlib.sha256(picture.read_bytes()).hexdigest()
        relative = stem.relative_to(root).as_posix()
        if digest in seen_bytes:
            skipped["same picture twice (first path kept)"] += 1
            print(f"  duplicate picture: {relative} = {seen_bytes[digest]}", file=sys.stderr)
            continue
        seen_bytes[digest] = relative
        english, translations = description(descriptions[stem])
        if not english:
            skipped["empty description"] += 1
            continue
        stamps.append(
            {"key": relative, "image": str(picture), "text": english, "label": relative.split("/", 1)[0],
             "translations": translations}
        )
    return stamps, skipped


def augmented_rows(stamps: list[dict], languages: list[str], split: SplitRule) -> list[dict]:
    """Translated copies of the training-split stamps, with keys that hash into the training split."""

    def held_out(key: str) -> bool:
        return assign_split(np.array([key], dtype=object), split)[0] != TRAIN

    rows = []
    for stamp in stamps:
        if held_out(stamp["key"]):
            continue
        for lang in languages:
            text = stamp["translations"].get(lang)
            if not text:
                continue
            key, attempt = f"{stamp['key']}#{lang}", 0
            while held_out(key):
                attempt += 1
                key = f"{stamp['key']}#{lang}~{attempt}"
            rows.append({**stamp, "key": key, "text": text, "language": lang})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stamps-dir", type=Path, default=STAMPS_DIR, help=f"default {STAMPS_DIR}")
    p.add_argument("--output", type=Path, default=Path("tuxpaint_manifest.csv"), help="the manifest (CSV) to write")
    p.add_argument("--min-per-category", type=int, default=20, help="leave out smaller categories (default 20)")
    p.add_argument("--augment-languages", default="", help="comma-separated, e.g. de,fr,ko (default: none)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="prepare's split.val_fraction (augmentation only)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="prepare's split.test_fraction (augmentation only)")
    p.add_argument("--salt", default="raypipe", help="prepare's split.salt (augmentation only)")
    args = p.parse_args(argv)

    if not args.stamps_dir.is_dir():
        print(f"error: {args.stamps_dir} is missing; install the Tux Paint stamps first:\n  {INSTALL_HINT}", file=sys.stderr)
        return 2
    stamps, skipped = find_stamps(args.stamps_dir)
    per_category = Counter(s["label"] for s in stamps)
    kept = {c for c, n in per_category.items() if n >= args.min_per_category}
    rows = [{**s, "language": "en"} for s in stamps if s["label"] in kept]
    languages = [lang.strip() for lang in args.augment_languages.split(",") if lang.strip()]
    extra = augmented_rows(rows, languages, SplitRule(args.val_fraction, args.test_fraction, args.salt)) if languages else []

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["key", "image", "text", "label", "language"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows + extra)

    print(f"{len(stamps)} unique stamps in {len(per_category)} categories under {args.stamps_dir}")
    for reason, count in sorted(skipped.items()):
        print(f"  left out: {count} x {reason}")
    for category, count in per_category.most_common():
        print(f"  {category:>14}: {count}" + ("" if category in kept else f"  (fewer than {args.min_per_category}: left out)"))
    print(f"{len(rows)} stamps in {len(kept)} categories -> {args.output}"
          + (f" (+ {len(extra)} augmented training rows in {', '.join(languages)})" if languages else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
