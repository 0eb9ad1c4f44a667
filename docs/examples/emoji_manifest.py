"""Build a manifest of labeled image-text pairs from the Noto emoji pictures and the CLDR emoji names.

    python docs/examples/emoji_manifest.py --packages ~/.cache/raypipe/emoji --output /tmp/emoji/manifest.csv
    python jobs/ingest.py manifest=/tmp/emoji/manifest.csv key_column=key output=/tmp/emoji/shards

The data come from two public npm packages, fetched with ``npm pack`` into --packages when their
tarballs are not there yet (about 80 MB; nothing is installed, the tarballs are read as they are):

    emoji-datasource-google@16.0.0   package/emoji.json (one entry per emoji: unified code points,
                                     category, subcategory, sort_order, skin_variations,
                                     has_img_google ...) and package/img/google/64/<image> (64x64
                                     PNG pictures of Google's Noto Color Emoji, Apache-2.0 per the
                                     package README; the package itself is MIT)
    emojibase-data@17.0.0            package/en/data.json: per emoji the CLDR short name (label) and
                                     CLDR keywords (tags), written by people for the CLDR annotations
                                     (the package is MIT; its changelog names CLDR 48 as the source)

One manifest row per base emoji of emoji.json (sort order), its picture extracted to
``<output folder>/emoji-images/<image>``:

    key     the code point sequence, lowercase, without variation selectors (U+FE0F, U+FE0E), e.g.
            1f600 or 2764 (red heart, 2764-FE0F in emoji.json): stable ids, so raypipe's key-hash
            train/validation split does not move between package versions, nor when an emoji's
            qualification changes
    image   absolute path of the 64x64 Google PNG (RGBA; ingest composites it on white)
    text    "<CLDR short name>: <CLDR keywords, comma-separated>", e.g. "grinning face: cheerful,
            cheery, face, grin, grinning, happy, laugh, nice, smile, smiling, teeth"; taken from
            emojibase-data, matched by the code point sequence with every FE0F/FE0E removed on both
            sides (emojibase drops FE0F from single code points, 263A, but keeps it inside
            sequences, 1F441-FE0F-200D-1F5E8-FE0F; emoji.json keeps it in both). An emoji with no
            match falls back to emoji.json's name, lowercased ("grinning face"); the count is
            reported
    label   emoji.json's category, which is the Unicode emoji group (Smileys & Emotion, People &
            Body, Animals & Nature, Food & Drink, Travel & Places, Activities, Objects, Symbols);
            the count of emoji whose emojibase group differs is reported
    subcategory  emoji.json's subcategory (face-smiling, animal-mammal ...), for analysis only

Left out, and counted by reason:

- the Component group (the five skin-tone swatches): parts of other emoji, not pictures of their own;
- the Flags group: its texts say "flag: <country>" outright, so the text states the label;
- skin-tone variants: emoji.json lists them under the base emoji's skin_variations (emojibase under
  ``skins``); only the base emoji (yellow skin) is a row, so that 5 to 25 near-copies of one
  picture with the same text cannot fall on both sides of the split;
- emoji without a Google picture (has_img_google false, or the file missing from the tarball);
- duplicates: a key seen before, or a picture byte-identical to an earlier emoji's (Noto draws some
  family sequences the same; the first in sort order is kept).

Group words in the keywords. Some CLDR keywords are the group's own name: "animal" is a keyword of
about 70% of the Animals & Nature emoji and "food" of about 40% of Food & Drink, much as "flag" is of
every flag. Such keywords state the label instead of describing the picture, so single-word keywords
that are a group's name (animal(s), nature, food, drink(s), travel, place(s), symbol(s), emotion,
smiley, people, body, activity, object: the same list for every row, so their absence is no clue
either) are removed from every text; the short name is kept as it is (it names the emoji, and only
about 20 short names contain such a word, e.g. "canned food", "peace symbol"). ``--keep-group-words``
keeps them. The script prints, per class, the share of rows whose text contains the class's own group
words, as the CLDR data have them and as written to the manifest. Keywords that are not a group's
name stay, even when they point to one class (e.g. "face" is in about 3 of 4 Smileys & Emotion texts):
they describe the picture.

Kept, though close to each other: the gendered forms of one emoji (person / man / woman
firefighter ...) are separate emoji with their own code points, pictures and texts, so they are
separate rows, and the key-hash split puts them on either side independently. Most People & Body
rows in validation or test have such a sibling in training, which makes that class easier than the
others for both modalities.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

GOOGLE = ("emoji-datasource-google", "16.0.0")
EMOJIBASE = ("emojibase-data", "17.0.0")
IMAGE_DIR = "package/img/google/64/"
LEFT_OUT_GROUPS = {
    "Component": "Component group (skin-tone swatches)",
    "Flags": "Flags group (the text names the flag)",
}
# Each group's own words, as they occur in the CLDR keywords (singular and plural).
GROUP_WORDS = {
    "Smileys & Emotion": {"smiley", "smileys", "emotion", "emotions"},
    "People & Body": {"people", "body"},
    "Animals & Nature": {"animal", "animals", "nature"},
    "Food & Drink": {"food", "foods", "drink", "drinks"},
    "Travel & Places": {"travel", "place", "places"},
    "Activities": {"activity", "activities"},
    "Objects": {"object", "objects"},
    "Symbols": {"symbol", "symbols"},
}
ALL_GROUP_WORDS = set().union(*GROUP_WORDS.values())


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def normalise(codes: str) -> str:
    """Code point sequence without variation selectors, lowercase: 2764-FE0F -> 2764."""
    return "-".join(c for c in codes.lower().split("-") if c not in ("fe0f", "fe0e"))


def slug(name: str) -> str:
    """Group name as emojibase keys it: "Smileys & Emotion" -> smileys-emotion."""
    return re.sub(r"[^a-z]+", "-", name.lower()).strip("-")


def tarball(packages: Path, name: str, version: str) -> Path:
    """The package's tarball in packages, downloaded with ``npm pack`` when it is not there."""
    path = packages / f"{name}-{version}.tgz"
    if path.is_file():
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(f"error: {path} is missing and npm is not installed to fetch it; install npm "
                         f"(e.g. apt-get install -y npm) or put the tarball there (npm pack {name}@{version})")
    packages.mkdir(parents=True, exist_ok=True)
    print(f"downloading {name}@{version} with npm pack -> {packages}", file=sys.stderr)
    subprocess.run([npm, "pack", f"{name}@{version}", "--pack-destination", str(packages)], check=True,
                   stdout=subprocess.DEVNULL)
    if not path.is_file():
        raise SystemExit(f"error: npm pack {name}@{version} did not write {path}")
    return path


def read_json(tar: tarfile.TarFile, member: str):
    f = tar.extractfile(member)
    if f is None:
        raise SystemExit(f"error: {member} is missing from {tar.name}")
    return json.load(f)


def build_rows(emoji: list[dict], cldr: list[dict], groups: dict[int, str], pictures: dict[str, bytes],
               keep_group_words: bool) -> tuple[list[dict], Counter, Counter]:
    """Manifest rows (with the picture bytes), counts left out by reason, and other counts."""
    by_code = {normalise(e["hexcode"]): e for e in cldr}
    skipped: Counter = Counter()
    counts: Counter = Counter()
    rows, seen_keys, seen_bytes = [], set(), {}
    for entry in sorted(emoji, key=lambda e: e["sort_order"]):
        category = entry["category"]
        variants = len(entry.get("skin_variations") or {})
        if category in LEFT_OUT_GROUPS:
            skipped[LEFT_OUT_GROUPS[category]] += 1
            skipped[f"skin-tone variant (of a {category} emoji)"] += variants
            continue
        skipped["skin-tone variant (listed under skin_variations; base emoji kept)"] += variants
        picture = pictures.get(entry["image"]) if entry.get("has_img_google") else None
        if picture is None:
            skipped["no Google picture (has_img_google false or file missing)"] += 1
            continue
        key = normalise(entry["unified"])
        if key in seen_keys:
            skipped["same key as an earlier emoji"] += 1
            continue
        digest = hashlib.sha256(picture).hexdigest()
        if digest in seen_bytes:
            skipped["same picture as an earlier emoji (first in sort order kept)"] += 1
            print(f"  duplicate picture: {key} ({entry['name'].lower()}) = {seen_bytes[digest]}", file=sys.stderr)
            continue
        seen_keys.add(key)
        seen_bytes[digest] = key
        match = by_code.get(key)
        if match is None:
            counts["no CLDR match (text: emoji.json name, lowercased)"] += 1
            print(f"  no CLDR match: {entry['unified']} ({entry['name']})", file=sys.stderr)
            name, tags = entry["name"].lower(), []
        else:
            name, tags = match["label"], list(match.get("tags") or [])
            if groups.get(match.get("group")) != slug(category):
                counts["emojibase group differs from emoji.json category"] += 1
        raw_text = f"{name}: {', '.join(tags)}" if tags else name
        if not keep_group_words:
            kept = [t for t in tags if t.lower() not in ALL_GROUP_WORDS]
            if len(kept) < len(tags):
                counts["rows with group-word keywords removed"] += 1
                counts["group-word keywords removed"] += len(tags) - len(kept)
            tags = kept
        rows.append({
            "key": key, "image_name": entry["image"], "picture": picture,
            "text": f"{name}: {', '.join(tags)}" if tags else name, "raw_text": raw_text,
            "label": category, "subcategory": entry.get("subcategory", ""),
        })
    return rows, +skipped, counts


def group_word_shares(rows: list[dict], column: str) -> dict[str, tuple[int, int]]:
    """Per class: (rows whose text contains the class's own group words, rows whose text contains
    another class's group words)."""
    shares = {}
    for label in sorted({r["label"] for r in rows}):
        own = GROUP_WORDS.get(label, set())
        others = ALL_GROUP_WORDS - own
        mine = [words(r[column]) for r in rows if r["label"] == label]
        shares[label] = (sum(1 for w in mine if w & own), sum(1 for w in mine if w & others))
    return shares


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packages", type=Path, default=Path.home() / ".cache/raypipe/emoji",
                   help="folder with the two npm tarballs; missing ones are fetched with npm pack "
                        "(default ~/.cache/raypipe/emoji)")
    p.add_argument("--output", type=Path, default=Path("emoji_manifest.csv"), help="the manifest (CSV) to write")
    p.add_argument("--images", type=Path, default=None,
                   help="where the pictures are extracted (default: emoji-images/ beside the manifest)")
    p.add_argument("--keep-group-words", action="store_true",
                   help="keep keywords that are a group's name (animal, food ...) in the texts")
    p.add_argument("--text-with-subcategory", action="store_true",
                   help="append the emoji's subcategory to its text (\"...; face smiling\"): a set on which text "
                        "nearly states the label, for trying fusion where text is far stronger than image")
    args = p.parse_args(argv)

    google_tgz = tarball(args.packages, *GOOGLE)
    emojibase_tgz = tarball(args.packages, *EMOJIBASE)
    with tarfile.open(emojibase_tgz) as tar:
        cldr = read_json(tar, "package/en/data.json")
        messages = read_json(tar, "package/en/messages.json")
    groups = {g["order"]: g["key"] for g in messages["groups"]}
    pictures: dict[str, bytes] = {}
    with tarfile.open(google_tgz) as tar:
        emoji = read_json(tar, "package/emoji.json")
        for member in tar:
            if member.isfile() and member.name.startswith(IMAGE_DIR):
                pictures[member.name[len(IMAGE_DIR):]] = tar.extractfile(member).read()

    rows, skipped, counts = build_rows(emoji, cldr, groups, pictures, args.keep_group_words)
    if args.text_with_subcategory:
        for row in rows:
            row["text"] += "; " + row["subcategory"].replace("-", " ")

    output = args.output.absolute()
    images = (args.images or output.parent / "emoji-images").absolute()
    images.mkdir(parents=True, exist_ok=True)
    for row in rows:
        path = images / row["image_name"]
        if not path.is_file() or path.read_bytes() != row["picture"]:
            path.write_bytes(row["picture"])
        row["image"] = str(path)
    with output.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["key", "image", "text", "label", "subcategory"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    per_class = Counter(r["label"] for r in rows)
    print(f"{len(emoji)} emoji in {GOOGLE[0]}@{GOOGLE[1]}, texts from {EMOJIBASE[0]}@{EMOJIBASE[1]} "
          f"({len(cldr)} entries)")
    for reason, count in sorted(skipped.items()):
        print(f"  left out: {count} x {reason}")
    for what in ("no CLDR match (text: emoji.json name, lowercased)", "emojibase group differs from emoji.json category",
                 "rows with group-word keywords removed", "group-word keywords removed"):
        print(f"  {what}: {counts[what]}")
    before, after = group_word_shares(rows, "raw_text"), group_word_shares(rows, "text")
    print("  rows whose text contains its own group's words (another group's words), CLDR -> manifest:")
    for label, count in per_class.most_common():
        (own0, other0), (own1, other1) = before[label], after[label]
        print(f"  {label:>17}: {count:4} rows   {own0 / count:4.0%} ({other0 / count:3.0%}) -> "
              f"{own1 / count:4.0%} ({other1 / count:3.0%})")
    print(f"{len(rows)} emoji in {len(per_class)} classes -> {output} (pictures in {images})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
