"""Write one data set's measured part of docs/results.md (and its pictures) from a finished run of
docs/examples/results.sh.

    python docs/examples/results_report.py --dataset tuxpaint --work ~/.cache/raypipe/tuxpaint [--results docs/results.md]

Reads <work>/shards/*_stats.json (ingest), <work>/prepared/stats.json (prepare),
<work>/runs/<set>/ablation.json (+ its PNGs) and <work>/runs/<set>/baselines.json, then replaces the
text between the set's two GENERATED markers of the results file and copies the pictures to
docs/images/<set>_ablation.png, <set>_fusion_confusion.png and <set>_fusion_calibration.png. Everything
outside the markers (the discussion) is left as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

from raypipe.calibration import ece_if_calibrated  # noqa: E402
from raypipe.pipeline.ablation import gap_in_stds, mean_std  # noqa: E402

DATASETS = {"tuxpaint": "Tux Paint", "emoji": "emoji"}
# Kim & Lee (2023), 5,000 COYO-700M pairs, validation accuracy (their Table 4 / Figure 6).
PAPER = {"image": 0.8267, "text": None, "fusion": 0.9315}
PAPER_EARLIER_IMAGE_TEXT = 0.8356
MODE_NAMES = {"image": "image only (CNN)", "text": "text only (LSTM-attention)", "fusion": "fusion (CNN + LSTM-attention)"}
IMAGES = {"ablation.png": "ablation.png", "ablation_confusion.png": "fusion_confusion.png",
          "ablation_calibration.png": "fusion_calibration.png"}  # <set>_<name> in docs/images


def markers(dataset: str) -> tuple[str, str]:
    return (f"<!-- BEGIN GENERATED {dataset} by docs/examples/results_report.py: do not edit by hand -->",
            f"<!-- END GENERATED {dataset} -->")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        sys.exit(f"error: {path} is missing; run docs/examples/results.sh first")


def _cell(mean: float, std: float, runs: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if runs > 1 else f"{mean:.4f}"


# Settings every run of the ablation sets on purpose (the paper's schedule, the modes, the seeds).
SCHEDULE = {"model.mode", "optim.seed", "optim.epochs", "optim.early_stopping_patience"}


def changed_settings(config: dict, defaults: dict, sections: tuple[str, ...], skip: set[str] = frozenset()) -> list[str]:
    """``section.field=value`` for every field of ``sections`` that differs from raypipe's default."""
    return [
        f"{section}.{name}={json.dumps(value)}"
        for section in sections
        for name, value in config[section].items()
        if f"{section}.{name}" not in skip and value != defaults[section][name]
    ]


def departures(work: Path, ablation: dict) -> list[str]:
    """The options of this run that differ from raypipe's defaults (prepare, then training), read
    from the prepare output and from a fusion run's bundle: each one is a departure to name."""
    from raypipe.config import PrepareConfig, TrainConfig, dump_config

    prepare = _read(work / "prepared" / "prepare_config.json")
    changed = changed_settings(prepare, dump_config(PrepareConfig()), ("image", "text", "vocab", "split"))
    run = next((r for r in ablation["runs"] if r["mode"] == "fusion"), ablation["runs"][0])
    trained = _read(Path(run["bundle"]) / "metrics.json")["config"]
    return changed + changed_settings(trained, dump_config(TrainConfig()), ("model", "optim", "scaling"), SCHEDULE)


def generated_block(dataset: str, work: Path, images_link: str) -> str:
    runs_dir = work / "runs" / dataset
    ablation = _read(runs_dir / "ablation.json")
    baselines = _read(runs_dir / "baselines.json")
    prepared = _read(work / "prepared" / "stats.json")
    ingest = Counter()
    for stats_file in sorted((work / "shards").glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        ingest.update({k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")})
    held_out = ablation["evaluate_split"]
    if held_out != "test":
        sys.exit(f"error: {runs_dir}/ablation.json was evaluated on {held_out!r}; this report needs the test split")

    rows = {r["mode"]: r for r in ablation["rows"]}
    seeds = ablation["seeds"] or [ablation["runs"][0]["seed"]]
    by_split = prepared["ok_by_split"]
    begin, end = markers(dataset)
    lines = [
        begin,
        "",
        f"Data: {ingest['count']} pairs ingested ({ingest['successes']} images converted, "
        f"{ingest['failed_to_download']} unreadable, {ingest['failed_to_resize']} undecodable); "
        f"prepare kept {prepared['rows_ok']} pairs in {prepared['num_classes']} classes "
        f"(vocabulary {prepared['vocab_size']}): {by_split.get('train', 0)} training, {by_split.get('val', 0)} "
        f"validation, {by_split.get('test', 0)} test. {len(seeds)} seed(s) per mode ({', '.join(map(str, seeds))}); "
        f"at most {max(r['epochs_run'] for r in ablation['runs'])} epochs run.",
        "",
        "| model | paper (COYO, accuracy) | val accuracy | **test accuracy** | test macro-F1 | test ECE (T=1 -> fitted) | best epoch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in ("image", "text", "fusion"):
        if mode not in rows:
            continue
        r = rows[mode]
        paper = f"{PAPER[mode]:.4f}" if PAPER[mode] is not None else "not reported"
        lines.append(
            f"| {MODE_NAMES[mode]} | {paper} | {_cell(r['val_accuracy'], r['val_accuracy_std'], r['runs'])} "
            f"| **{_cell(r['test_accuracy'], r['test_accuracy_std'], r['runs'])}** "
            f"| {_cell(r['test_macro_f1'], r['test_macro_f1_std'], r['runs'])} "
            f"| {r['test_ece_uncalibrated']:.3f} -> {r['test_ece']:.3f} | {r['best_epoch']:.1f} |"
        )
    lines.append(f"| the paper's earlier image-text model | {PAPER_EARLIER_IMAGE_TEXT:.4f} | - | - | - | - | - |")
    names = {"text": "linear: text TF-IDF + logistic regression", "image": "linear: image pixels + PCA + logistic regression",
             "late_fusion": "linear: late fusion (mean of the two probabilities)"}
    for key, label in names.items():
        val, test = baselines["results"]["val"][key], baselines["results"]["test"][key]
        lines.append(f"| {label} | - | {val['accuracy']:.4f} | {test['accuracy']:.4f} | {test['macro_f1']:.4f} | - | - |")
    lines.append("")
    changed = departures(work, ablation)
    lines.append("Settings that differ from raypipe's defaults: "
                 + (", ".join(f"`{c}`" for c in changed) if changed else "none (the default recipe)") + ".")
    lines.append("")
    lines.append("Mean ± sample standard deviation over the seeds (the same split for every run; a seed changes "
                 "initialisation and shuffling). Every choice (epochs kept, temperature, image share) was made on validation; "
                 "test was read once per run, after training. ECE: expected calibration error of the top-1 "
                 "probability, 15 bins, mean over the seeds. Linear baselines: one fit, C by 5-fold "
                 "cross-validation on the training split.")
    lines.append("")

    if {"image", "text", "fusion"} <= set(rows):
        # The ECE a perfectly calibrated model with the same confidences would show (computed from the bins, so
        # ablation.json files written before evaluate reported it are read too): per run and pooled.
        fusion_bins = [torch.tensor(r["bin_sums"]["calibrated"]) for r in ablation["runs"] if r["mode"] == "fusion"]
        floor_per_run = mean_std([ece_if_calibrated(b) for b in fusion_bins])[0]
        floor_pooled = ece_if_calibrated(sum(fusion_bins))
        best_single = max(("image", "text"), key=lambda m: rows[m]["test_accuracy"])
        gap = rows["fusion"]["test_accuracy"] - rows[best_single]["test_accuracy"]
        in_stds = gap_in_stds(ablation["rows"], "fusion", best_single, metric="test_accuracy")
        late = baselines["results"]["test"]["late_fusion"]["accuracy"]
        if min(rows["fusion"]["runs"], rows[best_single]["runs"]) < 2:
            spread = "cannot be judged with one seed per model (no spread)"
        else:
            spread = f"{in_stds:.1f} x the larger standard deviation -> **{'met' if in_stds > 2 else 'NOT met'}**"
        lines += [
            "Targets of the issue (test split):",
            "",
            f"- fusion above the better single modality ({best_single}) by more than two standard deviations: "
            f"difference {gap:+.4f}: {spread}",
            f"- fusion above the linear late-fusion baseline ({late:.4f}): "
            f"{rows['fusion']['test_accuracy'] - late:+.4f} -> **{'met' if rows['fusion']['test_accuracy'] > late else 'NOT met'}**",
            f"- fusion's expected calibration error after temperature scaling below 0.05: per run (mean over the seeds, "
            f"{by_split.get('test', 0)} test pairs each) {rows['fusion']['test_ece']:.3f} -> "
            f"**{'met' if rows['fusion']['test_ece'] < 0.05 else 'NOT met'}**, where a perfectly calibrated model with "
            f"the same confidences would show {floor_per_run:.3f} from sampling alone "
            f"(`calibration.ece_if_calibrated`); over the seeds' predictions pooled "
            f"(the reliability diagram below) {ablation['fusion']['ece']:.3f} (at T = 1: "
            f"{ablation['fusion']['ece_uncalibrated']:.3f}; a calibrated model: {floor_pooled:.3f}) -> "
            f"**{'met' if ablation['fusion']['ece'] < 0.05 else 'NOT met'}**",
            "",
        ]
    lines += [
        f"![validation accuracy per epoch, mean over seeds with a band of one standard deviation]({images_link}/{dataset}_{IMAGES['ablation.png']})",
        "",
    ]
    if ablation.get("fusion"):
        lines += [
            f"![fusion model: test confusion matrix, summed over the seeds]({images_link}/{dataset}_{IMAGES['ablation_confusion.png']})"
            f" ![fusion model: test reliability diagram before and after temperature scaling, summed over the seeds]"
            f"({images_link}/{dataset}_{IMAGES['ablation_calibration.png']})",
            "",
        ]
    per_mode = {}
    for run in ablation["runs"]:
        per_mode.setdefault(run["mode"], []).append(f"{run['epochs_run']} (best {run['best_epoch']})")
    lines.append("Epochs run per seed (best epoch): " + "; ".join(f"{m} {', '.join(e)}" for m, e in per_mode.items()) + ".")
    shares = [str(run["image_share"]) for run in ablation["runs"] if run["mode"] == "fusion" and run.get("image_share") is not None]
    if shares:
        lines += ["", "Fusion's image share of the late-fusion sum, fitted on validation, per seed: " + ", ".join(shares) + "."]
    lines += ["", end]
    return "\n".join(lines)


def replace_block(text: str, block: str, dataset: str) -> str:
    begin, end = markers(dataset)
    if begin not in text or end not in text:
        raise SystemExit(f"error: the results file has no {begin!r} ... {end!r} markers to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + block + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--work", type=Path, required=True, help="the WORK folder of results.sh")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    p.add_argument("--images", type=Path, default=REPO / "docs" / "images")
    args = p.parse_args(argv)
    link = Path("images") if args.images.resolve() == (REPO / "docs" / "images").resolve() else args.images.resolve()
    block = generated_block(args.dataset, args.work, str(link))
    args.results.write_text(replace_block(args.results.read_text(), block, args.dataset))
    args.images.mkdir(parents=True, exist_ok=True)
    runs_dir = args.work / "runs" / args.dataset
    for source, target in IMAGES.items():
        if (runs_dir / source).exists():
            shutil.copyfile(runs_dir / source, args.images / f"{args.dataset}_{target}")
    print(block)
    print(f"-> {args.results}, {args.images}/{args.dataset}_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
