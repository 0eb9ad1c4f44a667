#!/usr/bin/env bash
# Reproduce one data set's part of docs/results.md: the paper's ablation (image / text / fusion, five
# seeds) with raypipe's default recipe, scored on the held-out test split, and the linear baselines.
#
#   bash docs/examples/results.sh tuxpaint      # Debian's tuxpaint-stamps-default (apt-get install ...)
#   bash docs/examples/results.sh emoji         # npm's emoji-datasource-google + emojibase-data (npm pack)
#   make results                                # both, from the repository root
#
# Needs the `results` extra (.venv/bin/python -m pip install -e '.[results]': scikit-learn, cairosvg).
# Steps: manifest (docs/examples/<set>_manifest.py) -> jobs/ingest.py -> jobs/prepare.py
# (labels.column=label; 80/10/10 key-hash split) -> jobs/ablation.py (seeds, early stopping on validation,
# each run evaluated on test) -> python -m raypipe.tools.baselines -> docs/examples/results_report.py
# (docs/results.md between the set's GENERATED markers, docs/images/<set>_*.png).
#
# Settings (environment):
#   WORK=~/.cache/raypipe/<set>   where packages, manifest, shards, prepared data and runs go
#   SEEDS=[0,1,2,3,4]  EPOCHS=100  PATIENCE=10   ablation seeds, maximum epochs, early-stopping patience
#   RESUME=1           keep WORK's shards, prepared data and finished runs (default: start afresh)
#   RESULTS_MD=docs/results.md  IMAGES_DIR=docs/images   where the report goes
#   PREPARE_ARGS="image.resize_mode=pad vocab.min_freq=1"   extra overrides for jobs/prepare.py
# Extra arguments go to jobs/ablation.py (e.g. --config jobs/configs/paper.yaml, or model.fusion_head=mlp):
# the report lists every setting that differs from raypipe's defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."

DATASET=${1:-}
case "$DATASET" in tuxpaint|emoji) shift ;; *) echo "usage: $0 tuxpaint|emoji [ablation overrides...]" >&2; exit 2 ;; esac
PY=${PY:-.venv/bin/python}
WORK=${WORK:-$HOME/.cache/raypipe/$DATASET}
SEEDS=${SEEDS:-[0,1,2,3,4]}
EPOCHS=${EPOCHS:-100}
PATIENCE=${PATIENCE:-10}
RESULTS_MD=${RESULTS_MD:-docs/results.md}
IMAGES_DIR=${IMAGES_DIR:-docs/images}
read -r -a PREPARE_EXTRA <<< "${PREPARE_ARGS:-}"
export RAY_DATA_DISABLE_PROGRESS_BARS=${RAY_DATA_DISABLE_PROGRESS_BARS:-1}

if ! "$PY" -c "import sklearn, cairosvg" 2>/dev/null; then
    echo "error: the results extra is missing; install it with: $PY -m pip install -e '.[results]'" >&2
    exit 2
fi
case "$DATASET" in
    tuxpaint)
        if [ ! -d /usr/share/tuxpaint/stamps ]; then
            echo "error: the Tux Paint stamps are missing; install them with:" >&2
            echo "  apt-get install -y --no-install-recommends tuxpaint-stamps-default" >&2
            exit 2
        fi
        MANIFEST=(docs/examples/tuxpaint_manifest.py --output "$WORK/manifest.csv")
        INGEST=("keep_columns=[language]" shard_size=200) ;;
    emoji)  # the manifest script fetches the two tarballs with `npm pack` when they are not in WORK/packages
        MANIFEST=(docs/examples/emoji_manifest.py --packages "$WORK/packages" --output "$WORK/manifest.csv")
        INGEST=("keep_columns=[subcategory]" shard_size=500) ;;
esac
if [ "${RESUME:-0}" != 1 ]; then
    rm -rf "$WORK/shards" "$WORK/prepared" "$WORK/runs"
fi
mkdir -p "$WORK"
started=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - started )) s)"; }

step "manifest"
"$PY" "${MANIFEST[@]}"

if [ ! -f "$WORK/shards/00000_stats.json" ]; then
    step "ingest"
    "$PY" jobs/ingest.py manifest="$WORK/manifest.csv" key_column=key output="$WORK/shards" overwrite=true "${INGEST[@]}"
fi

if [ ! -f "$WORK/prepared/stats.json" ]; then
    step "prepare"
    "$PY" jobs/prepare.py data.input="$WORK/shards" labels.column=label output="$WORK/prepared" overwrite=true \
        ${PREPARE_EXTRA[@]+"${PREPARE_EXTRA[@]}"}
fi

step "ablation: seeds $SEEDS, at most $EPOCHS epochs, patience $PATIENCE"
"$PY" jobs/ablation.py prepared="$WORK/prepared" run.storage_path="$WORK/runs" run.name="$DATASET" \
    "seeds=$SEEDS" optim.epochs="$EPOCHS" optim.early_stopping_patience="$PATIENCE" "$@"

step "linear baselines"
"$PY" -m raypipe.tools.baselines "$WORK/prepared" --output "$WORK/runs/$DATASET"

step "report"
"$PY" docs/examples/results_report.py --dataset "$DATASET" --work "$WORK" --results "$RESULTS_MD" --images "$IMAGES_DIR"
echo "done in $(( $(date +%s) - started )) s"
