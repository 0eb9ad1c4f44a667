#!/usr/bin/env bash
# Install NLTK's WordNet data (for raypipe's lemmatizer) without needing the NLTK download host.
#
#   bash scripts/install_wordnet.sh [PYTHON]        (PYTHON defaults to python3)
#
# Target: <sys.prefix of PYTHON>/nltk_data (on NLTK's default search path, so Ray workers running
# the same interpreter find it too); override with NLTK_DATA_DIR=/some/dir (then export
# NLTK_DATA=/some/dir for the jobs, unless the directory is on NLTK's default path anyway).
#
# Does nothing (silently, exit 0) when PYTHON's NLTK already finds complete WordNet data (with
# NLTK_DATA_DIR set: in that directory).
# Route 1 (offline, Debian/Ubuntu): apt packages wordnet-base + wordnet-sense-index, whose files are
#   COPIED (NLTK refuses symlinks and paths outside its data path) into <dir>/corpora/wordnet/,
#   plus the `lexnames` file Debian lacks (scripts/wordnet/lexnames, WordNet 3.0's own).
# Route 2 (fallback, needs internet): PYTHON -m nltk.downloader -d <dir> wordnet.
# Exits 1 with a message when both fail.
set -euo pipefail
# NLTK >= 3.10 refuses data directories that are group- or world-writable.
umask 022

PY="${1:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LEXNAMES="$HERE/wordnet/lexnames"
DEB_PACKAGES=(wordnet-base wordnet-sense-index)

log() { echo "install_wordnet: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v "$PY" >/dev/null 2>&1 || [ -x "$PY" ] || die "python interpreter not found: $PY"
"$PY" -c "import nltk" 2>/dev/null || die "$PY cannot import nltk; install the project first (pip install -e .)"

PREFIX="$("$PY" -c 'import sys; print(sys.prefix)')"
TARGET="${NLTK_DATA_DIR:-$PREFIX/nltk_data}"
WN_DIR="$TARGET/corpora/wordnet"

# The checks, run with PYTHON; an argument makes that directory NLTK's only data directory.
# quick_check: every file NLTK's WordNet reader opens is findable and sane (~1 s, mostly
# `import nltk`); full_check: NLTK really lemmatizes with it (~5 s: NLTK 3.10 builds its whole
# WordNet reader), run after installing.
quick_check() {
    "$PY" - "$@" <<'EOF'
import sys
import nltk
if len(sys.argv) > 1:
    nltk.data.path[:] = sys.argv[1:]
files = ["lexnames", "index.sense", "cntlist.rev"] + [
    f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")
] + [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")]
def find(name):
    try:
        return nltk.data.find(f"corpora/wordnet/{name}")
    except LookupError:
        return nltk.data.find(f"corpora/wordnet.zip/wordnet/{name}")
pointers = {name: find(name) for name in files}
with pointers["lexnames"].open() as f:
    assert len(f.read().splitlines()) == 45, "lexnames is not WordNet 3.0's (45 lines)"
with pointers["verb.exc"].open() as f:
    assert b"\nswam swim\n" in f.read(), "verb.exc lacks 'swam swim'"
EOF
}
full_check() {
    "$PY" - "$@" <<'EOF'
import sys
import nltk
if len(sys.argv) > 1:
    nltk.data.path[:] = sys.argv[1:]
from nltk.corpus import wordnet as wn
from nltk.stem import WordNetLemmatizer
lem = WordNetLemmatizer()
assert wn.synsets("dog"), "no synsets for 'dog'"
assert lem.lemmatize("swam", "v") == "swim", lem.lemmatize("swam", "v")
assert lem.lemmatize("mice", "n") == "mouse", lem.lemmatize("mice", "n")
EOF
}

# Already installed? Without NLTK_DATA_DIR: wherever PYTHON's NLTK finds it; with it: in that dir.
if [ -n "${NLTK_DATA_DIR:-}" ]; then
    if quick_check "$TARGET" >/dev/null 2>&1; then exit 0; fi
elif quick_check >/dev/null 2>&1; then
    exit 0
fi

run_root() {  # run a command as root: directly, through sudo, or not at all
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "not root and no sudo: cannot run $*"
        return 1
    fi
}

route_debian() {
    if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
        log "apt-get/dpkg not available"
        return 1
    fi
    if ! dpkg -s "${DEB_PACKAGES[@]}" >/dev/null 2>&1; then
        log "installing Debian packages ${DEB_PACKAGES[*]}"
        local aptlog
        aptlog="$(mktemp)"
        # Wait for a concurrent apt/dpkg run instead of failing on its lock; show apt's output
        # only when it fails.
        if ! { run_root env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update &&
               run_root env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
                   install --no-install-recommends "${DEB_PACKAGES[@]}"; } >"$aptlog" 2>&1; then
            tail -n 20 "$aptlog" >&2
            rm -f "$aptlog"
            log "apt-get failed"
            return 1
        fi
        rm -f "$aptlog"
    fi
    local files=() sense_index
    local f
    for f in /usr/share/wordnet/*.*; do
        [ -f "$f" ] && files+=("$f")
    done
    # Where the package put index.sense (Debian: /usr/share/wordnet/index.sense; ask dpkg anyway).
    sense_index="$(dpkg -L wordnet-sense-index 2>/dev/null | grep -E '/index\.sense$' | head -n1 || true)"
    if [ -n "$sense_index" ] && [ -f "$sense_index" ] && [ "$(dirname "$sense_index")" != /usr/share/wordnet ]; then
        files+=("$sense_index")
    fi
    [ "${#files[@]}" -gt 0 ] || { log "no WordNet files under /usr/share/wordnet"; return 1; }
    [ -f "$LEXNAMES" ] || { log "missing $LEXNAMES"; return 1; }
    mkdir -p "$TARGET/corpora" || return 1
    # Copy into a fresh directory, then swap it in, so a half-finished copy is never used.
    local tmp="$TARGET/corpora/.wordnet.tmp.$$"
    rm -rf "$tmp"
    # (set -e does not apply inside a function called from an `if`: check every step.)
    mkdir -p "$tmp" || return 1
    # install(1) dereferences symlinks: real files, readable by every user (Ray workers).
    install -m 0644 -- "${files[@]}" "$tmp/" || { rm -rf "$tmp"; return 1; }
    install -m 0644 -- "$LEXNAMES" "$tmp/lexnames" || { rm -rf "$tmp"; return 1; }
    rm -rf "$WN_DIR" && mv "$tmp" "$WN_DIR" || return 1
    chmod go-w "$TARGET" "$TARGET/corpora" "$WN_DIR" 2>/dev/null || true
    log "copied ${#files[@]} WordNet files + lexnames into $WN_DIR"
}

route_download() {
    log "trying the NLTK downloader (needs internet)"
    local t=()
    command -v timeout >/dev/null 2>&1 && t=(timeout 300)
    "${t[@]}" "$PY" -m nltk.downloader -q -d "$TARGET" wordnet >&2 || return 1
}

if route_debian && full_check "$TARGET" >/dev/null 2>&1; then
    log "WordNet installed from Debian packages into $WN_DIR"
elif route_download && full_check "$TARGET" >/dev/null 2>&1; then
    log "WordNet installed with the NLTK downloader into $TARGET"
else
    full_check "$TARGET" 2>&1 | tail -n 3 >&2 || true
    die "could not install WordNet into $TARGET.
  Route 1 (offline): apt-get install -y --no-install-recommends ${DEB_PACKAGES[*]} (as root), then re-run this script.
  Route 2 (internet): $PY -m nltk.downloader -d $TARGET wordnet"
fi

if [ -n "${NLTK_DATA_DIR:-}" ] && ! quick_check >/dev/null 2>&1; then
    log "note: $TARGET is not on NLTK's default search path; export NLTK_DATA=$TARGET for the jobs"
fi
