#!/usr/bin/env bash
# Reproduce docs/results.md: the paper's ablation (image / text / fusion, several seeds) and linear
# baselines on the Tux Paint stamps. Needs the Debian package and the `results` extra:
#
#   apt-get install -y --no-install-recommends tuxpaint-stamps-default
#   .venv/bin/python -m pip install -e '.[results]'
#   bash docs/examples/tuxpaint_results.sh                       # from the repository root
#
# Steps: manifest (docs/examples/tuxpaint_manifest.py) -> jobs/ingest.py -> jobs/prepare.py
# (labels.column=label) -> jobs/ablation.py (seeds, early stopping, fusion confusion matrix)
# -> python -m raypipe.tools.baselines -> docs/examples/tuxpaint_report.py (docs/results.md between its
# GENERATED markers, docs/images/tuxpaint_*.png).
#
# Settings (environment):
#   WORK=~/.cache/raypipe/tuxpaint   where manifest, shards, prepared data and runs go
#   SEEDS=[0,1,2,3,4]  EPOCHS=100  PATIENCE=10   ablation seeds, maximum epochs, early-stopping patience
#   RESUME=1           keep WORK's shards, prepared data and finished runs (default: start afresh)
#   RESULTS_MD=docs/results.md  IMAGES_DIR=docs/images   where the report goes
#   PREPARE_ARGS="image.resize_mode=pad vocab.min_freq=1"   extra overrides for jobs/prepare.py
#   DEPARTURES="optim.augment=true model.modality_dropout=0.5 model.aux_heads=true"
#                      the training departures docs/results.md names and measured (DEPARTURES= for the
#                      paper's settings alone)
# Extra arguments are passed to jobs/ablation.py after them, e.g. optim.class_weighting=balanced.
# Any override is a departure from the paper's settings: the report lists every one it finds.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
WORK=${WORK:-$HOME/.cache/raypipe/tuxpaint}
SEEDS=${SEEDS:-[0,1,2,3,4]}
EPOCHS=${EPOCHS:-100}
PATIENCE=${PATIENCE:-10}
RESULTS_MD=${RESULTS_MD:-docs/results.md}
IMAGES_DIR=${IMAGES_DIR:-docs/images}
read -r -a PREPARE_EXTRA <<< "${PREPARE_ARGS:-}"
read -r -a DEPARTURE_ARGS <<< "${DEPARTURES-optim.augment=true model.modality_dropout=0.5 model.aux_heads=true}"
export RAY_DATA_DISABLE_PROGRESS_BARS=${RAY_DATA_DISABLE_PROGRESS_BARS:-1}

if [ ! -d /usr/share/tuxpaint/stamps ]; then
    echo "error: the Tux Paint stamps are missing; install them with:" >&2
    echo "  apt-get install -y --no-install-recommends tuxpaint-stamps-default" >&2
    exit 2
fi
if ! "$PY" -c "import sklearn, cairosvg" 2>/dev/null; then
    echo "error: the results extra is missing; install it with: $PY -m pip install -e '.[results]'" >&2
    exit 2
fi
if [ "${RESUME:-0}" != 1 ]; then
    rm -rf "$WORK/shards" "$WORK/prepared" "$WORK/runs"
fi
mkdir -p "$WORK"
started=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - started )) s)"; }

step "manifest"
"$PY" docs/examples/tuxpaint_manifest.py --output "$WORK/manifest.csv"

if [ ! -f "$WORK/shards/00000_stats.json" ]; then
    step "ingest"
    "$PY" jobs/ingest.py manifest="$WORK/manifest.csv" key_column=key "keep_columns=[language]" \
        output="$WORK/shards" shard_size=200 overwrite=true
fi

if [ ! -f "$WORK/prepared/stats.json" ]; then
    step "prepare"
    "$PY" jobs/prepare.py data.input="$WORK/shards" labels.column=label output="$WORK/prepared" overwrite=true \
        ${PREPARE_EXTRA[@]+"${PREPARE_EXTRA[@]}"}
fi

step "ablation: seeds $SEEDS, at most $EPOCHS epochs, patience $PATIENCE"
"$PY" jobs/ablation.py prepared="$WORK/prepared" run.storage_path="$WORK/runs" run.name=tuxpaint \
    "seeds=$SEEDS" optim.epochs="$EPOCHS" optim.early_stopping_patience="$PATIENCE" confusion_matrix=true \
    ${DEPARTURE_ARGS[@]+"${DEPARTURE_ARGS[@]}"} "$@"

step "linear baselines"
"$PY" -m raypipe.tools.baselines "$WORK/prepared" --output "$WORK/runs/tuxpaint"

step "report"
"$PY" docs/examples/tuxpaint_report.py --work "$WORK" --results "$RESULTS_MD" --images "$IMAGES_DIR"
echo "done in $(( $(date +%s) - started )) s"
