"""Labeling: `jobs/label.py` on local Ray beside a plain single-process loop, and its memory as work grows.

    python benchmarks/label_throughput.py [--rows 10000,100000] [--memory-rows 10000,100000] [--bundle URL]
        [--trained] [--precision fp32,bf16]

Inputs: the built-in sample (``raypipe.datasets.sample``) in img2dataset's Parquet format with 384x288 JPEGs
(img2dataset's ``--image_size 384 --resize_mode keep_ratio`` output size), 1,000 pairs per shard,
generated once and cached under ``$TMPDIR/raypipe-bench/``; a run over N rows reads the first N/1000
shards. About 2% of rows are failed downloads and ~10% of captions have no words left after
cleaning, so the error paths are exercised as in a crawl.

Model: ``--bundle``, or by default a bundle with the default architecture (the train job's defaults:
3 conv blocks 32/64/128, embedding 128, LSTM 128, FC 256) and random weights (seed 0) over the sample's
vocabulary: the cost per pair is the trained model's, the labels are meaningless. ``--trained``: the same
architecture trained in-process (fp32, 400 steps of 64 on the first 2,000 rows; ~0.9 accuracy on them), for
figures where agreement means something (random weights give near-ties on every row).

``--precision fp32,bf16``: each measurement once per ``predict.precision``; with two or more, the plain loops'
top-1 agreement with the first one and their largest probability difference, and how many rows bf16
ran again in fp32 (close calls).

Measured, in one process tree on the same files, for each of ``--rows``:

1. plain loop: what a user writes by hand, in one process: pyarrow reads each file in batches ->
   the same normalize / preprocess / model / output-table functions the job uses -> one Parquet file
   per input. PyTorch uses its default intra-op threads (all cores) for the model.
2. the job: ``python jobs/label.py`` as a user runs it (starts a local Ray cluster), ``overwrite=true``.
   Figures: end to end (process start to exit) and the labeling phase (its ``_summary.json``:
   ``labeling_s`` excludes the Ray start and the final completeness check). Only CPU time is sampled
   here: reading every process's memory map twice a second costs the job a few percent.
3. memory, in runs of their own for each of ``--memory-rows``: peak PSS of the job's whole process
   tree (driver, raylet, GCS, workers; shared object-store pages counted once), sampled every 0.5 s,
   with the peak sample's split by process name and by kind (heap, object store, mapped files).

Prints one summary line; everything goes to benchmarks/results/label_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common` when run as a script

from common import ProcessSampler, load_average, machine_info, rate, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE = 1000
IMAGE_SIZE = (384, 288)


def ensure_data(root: Path, rows: int) -> list[Path]:
    """The first ``rows`` rows of the cached sample (whole shards), generated when missing."""
    from raypipe.datasets.sample import SampleSpec, write_sample

    marker = root / "sample.json"
    have = json.loads(marker.read_text())["num_pairs"] if marker.exists() else 0
    if have < rows:
        print(f"writing the sample ({rows} pairs, {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEGs) to {root} ...", flush=True)
        summary = write_sample(str(root), SampleSpec(rows, SHARD_SIZE, IMAGE_SIZE), formats=("parquet",))
        marker.write_text(json.dumps(summary, indent=1))
    files = sorted((root / "parquet").glob("*.parquet"))
    return files[: -(-rows // SHARD_SIZE)]


def ensure_bundle(path: Path, data: list[Path]) -> str:
    """The default architecture with random weights over the sample's vocabulary."""
    if (path / "model.pt").exists():
        return str(path)
    import pyarrow.parquet as pq
    import torch

    from raypipe.bundle import Bundle, save_bundle
    from raypipe.config import ModelSection, StorageConfig
    from raypipe.model import FusionClassifier, ModelConfig
    from raypipe.datasets.sample import CLASSES
    from raypipe.transforms.image import ImageOptions
    from raypipe.transforms.text import TextNormalizer, TextOptions
    from raypipe.transforms.vocab import Vocabulary, count_tokens

    text = TextOptions()
    normalizer = TextNormalizer(text)
    captions = pq.read_table(data[0], columns=["caption"]).column(0).to_pylist()
    vocab = Vocabulary.from_counts(count_tokens(normalizer.tokens(c or "") for c in captions), min_freq=2)
    torch.manual_seed(0)
    config = ModelConfig(num_classes=len(CLASSES), vocab_size=len(vocab), **ModelSection().model_dump())
    model = FusionClassifier(config)
    save_bundle(str(path), StorageConfig(), Bundle(config, ImageOptions(), text, vocab, tuple(CLASSES),
                                                    model.state_dict(), {"note": "random weights (benchmark)"}))
    return str(path)


def ensure_trained_bundle(path: Path, data: list[Path], steps: int = 400) -> str:
    """The default architecture trained in fp32 on the first 2,000 rows (the sample's labels)."""
    if (path / "model.pt").exists():
        return str(path)
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from raypipe import schema
    from raypipe.bundle import Bundle, load_bundle, save_bundle
    from raypipe.config import StorageConfig
    from raypipe.datasets.sample import CLASSES
    from raypipe.io.normalize import IMG2DATASET_COLUMNS, normalize_table
    from raypipe.pipeline.train import train_step
    from raypipe.transforms.pairs import ModelInputPreparer

    random = load_bundle(ensure_bundle(path.parent / "label-bundle-default-random", data), StorageConfig())
    table = pq.read_table(data[:2], columns=["key", "jpg", "caption", "status", "error_message", "label"])
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.schema.names}
    batch["path"] = np.full(table.num_rows, "train", dtype=object)
    labels = batch.pop("label")
    prepared = ModelInputPreparer(random.image, random.text, random.vocab.token_to_id)(
        normalize_table(batch, IMG2DATASET_COLUMNS))
    ok = prepared[schema.STATUS] == "ok"
    images = torch.from_numpy(prepared[schema.IMAGE][ok])
    tokens = torch.from_numpy(prepared[schema.TOKENS][ok]).long()
    targets = torch.tensor([CLASSES.index(label) for label in labels[ok]])
    print(f"training the default architecture on {len(targets)} rows ({steps} steps) ...", flush=True)
    model = random.build_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler, loss_fn, draw = torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss(), torch.Generator()
    draw.manual_seed(0)
    torch.set_flush_denormal(True)
    for _ in range(steps):
        i = torch.randint(0, len(targets), (64,), generator=draw)
        train_step(model, optimizer, scaler, loss_fn, images[i], tokens[i], targets[i], 0.0, None)
    torch.set_flush_denormal(False)
    model.eval()
    with torch.no_grad():
        accuracy = float((torch.cat([model(images[i:i + 256], tokens[i:i + 256]).argmax(1)
                                     for i in range(0, len(targets), 256)]) == targets).float().mean())
    print(f"  accuracy on its training rows {accuracy:.3f}", flush=True)
    save_bundle(str(path), StorageConfig(), Bundle(
        random.model_config, random.image, random.text, random.vocab, random.classes, model.state_dict(),
        {"note": f"benchmark: {steps} steps on the first 2,000 sample rows", "train_accuracy": accuracy}))
    return str(path)


def plain_loop(files: list[Path], bundle_url: str, out_dir: Path, batch_size: int, precision: str = "auto",
               predictions: list | None = None) -> dict:
    """One process, no Ray: read -> normalize -> preprocess -> model -> output table -> Parquet per file.
    ``predictions``, when given, gets each row's (label_id, top_k_labels, top_k_scores)."""
    import numpy as np
    import pyarrow.parquet as pq

    from raypipe.bundle import load_bundle
    from raypipe.config import StorageConfig
    from raypipe.io.normalize import normalize_table
    from raypipe.io.normalize import IMG2DATASET_COLUMNS
    from raypipe.pipeline.label_writer import output_schema, to_output_table
    from raypipe.pipeline.predict import BundlePredictor
    from raypipe.transforms.pairs import ModelInputPreparer

    started, cpu_started = time.perf_counter(), time.process_time()
    bundle = load_bundle(bundle_url, StorageConfig())
    preparer = ModelInputPreparer(bundle.image, bundle.text, bundle.vocab.token_to_id, bundle.model_config.mode)
    predictor = BundlePredictor(bundle_url, StorageConfig(), top_k=3, precision=precision)
    out_schema = output_schema({}, explain=False)
    rows = ok = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in files:
        with pq.ParquetWriter(out_dir / path.name, out_schema) as writer:
            reader = pq.ParquetFile(path)
            for record_batch in reader.iter_batches(batch_size, columns=["key", "jpg", "caption", "status", "error_message"]):
                batch = {name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in record_batch.schema.names}
                batch["path"] = np.full(record_batch.num_rows, str(path), dtype=object)
                table = to_output_table(predictor(preparer(normalize_table(batch, IMG2DATASET_COLUMNS))),
                                        out_schema, bundle.identity)
                writer.write_table(table)
                if predictions is not None:
                    predictions += zip(*(table.column(c).to_pylist() for c in ("label_id", "top_k_labels",
                                                                          "top_k_scores")))
                rows += table.num_rows
                ok += sum(s == "ok" for s in table.column("status").to_pylist())
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    # cores_busy: how much of the machine the loop already uses (torch runs the model on every core).
    return {"rows": rows, "ok": ok, "wall_s": round(wall, 2), "pairs_per_s": rate(rows, wall),
            "cpu_s": round(cpu, 1), "cores_busy": round(cpu / wall, 2), "precision": predictor.precision,
            "rechecked_fp32": predictor.rechecked}


def agreement(reference: list, other: list) -> dict:
    """Top-1 agreement over the rows both labeled, and the largest difference of a top-k score."""
    both = [(a, b) for a, b in zip(reference, other) if a[0] is not None and b[0] is not None]
    same = sum(a[0] == b[0] for a, b in both)
    diff = 0.0
    for a, b in both:
        theirs = dict(zip(b[1], b[2]))
        diff = max(diff, *(abs(score - theirs[name]) for name, score in zip(a[1], a[2]) if name in theirs))
    return {"rows": len(both), "top1_agreement": round(same / max(len(both), 1), 5), "disagreements": len(both) - same,
            "max_top_k_score_diff": round(diff, 4)}


def label_job(files: list[Path], bundle_url: str, out_dir: Path, extra: list[str], memory: bool) -> dict:
    """``python jobs/label.py`` in a subprocess (its own local Ray cluster), sampled for CPU (and memory)."""
    inputs = "[" + ",".join(str(f) for f in files) + "]"
    cmd = [sys.executable, str(REPO / "jobs" / "label.py"), f"data.input={inputs}", f"bundle={bundle_url}",
           f"output={out_dir}", "overwrite=true", "ray.progress_bars=false", *extra]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with ProcessSampler(proc.pid, memory=memory) as sampler:
        log, _ = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(log[-4000:])
        raise SystemExit(f"the labeling job failed (exit {proc.returncode}): {' '.join(cmd[:3])} ...")
    summary = json.loads((out_dir / "_summary.json").read_text())
    shutil.rmtree(out_dir)
    result = {
        "rows": summary["rows_processed"],
        "ok": summary["rows_labeled"],
        "complete": summary["complete"],
        "by_status": summary["by_status"],
        "wall_s": round(wall, 2),
        "end_to_end_pairs_per_s": rate(summary["rows_processed"], wall),
        "labeling_s": summary["labeling_s"],
        "labeling_pairs_per_s": summary["pairs_per_s"],
        "precision": summary.get("precision"),
        "tree_cpu_s": round(sampler.cpu_s, 1),
        "processes_seen": len(sampler.names),
    }
    if memory:
        result.update(
            peak_pss_mib=round(sampler.peak_pss_mib),
            peak_pss_by_name_mib=sampler.peak_pss_by_name_mib,
            peak_pss_by_kind_mib=sampler.peak_pss_by_kind_mib,
            peak_rss_sum_mib=round(sampler.peak_rss_mib),
        )
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="10000,100000", help="comma-separated row counts for the job-vs-plain-loop runs")
    p.add_argument("--memory-rows", default="10000,100000", help="comma-separated row counts for the memory runs")
    p.add_argument("--bundle", help="a trained bundle (default: the default architecture, random weights)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="rows per model call, both sides (and per read batch in the plain loop; the job reads "
                        "with its own ray.batch_size)")
    p.add_argument("--data-dir", help="where the sample is cached (default: $TMPDIR/raypipe-bench/label-...)")
    p.add_argument("--skip-plain", action="store_true", help="only the job (e.g. to re-measure memory)")
    p.add_argument("--job-arg", action="append", default=[], help="extra section.field=value for the job")
    p.add_argument("--tag", help="results file suffix: label_throughput-<tag>.json")
    p.add_argument("--trained", action="store_true",
                   help="the default architecture trained in-process on the sample (default: random weights)")
    p.add_argument("--precision", default="auto",
                   help="comma-separated predict.precision values (auto, fp32, bf16, fp16) to measure in turn")
    return p.parse_args(argv)


def _row_counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    compare_rows, memory_rows = _row_counts(args.rows), _row_counts(args.memory_rows)
    bench = Path(tempfile.gettempdir()) / "raypipe-bench"
    name = f"label-{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}-shard{SHARD_SIZE}-seed0"
    root = Path(args.data_dir) if args.data_dir else bench / name
    all_files = ensure_data(root, max([*compare_rows, *memory_rows]))
    if args.trained and not args.bundle:
        bundle_url = ensure_trained_bundle(bench / "label-bundle-default-trained", all_files)
    else:
        bundle_url = args.bundle or ensure_bundle(bench / "label-bundle-default-random", all_files)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    predictions: dict[int, dict[str, list]] = {}  # rows -> precision -> the plain loop's predictions
    work = Path(tempfile.mkdtemp(prefix="label-out-", dir=bench))
    extra = [f"predict.batch_size={args.batch_size}", *args.job_arg]
    results: dict = {"machine": machine_info(), "batch_size": args.batch_size, "image_size": list(IMAGE_SIZE),
                     "bundle": bundle_url, "job_args": extra, "compare": {}, "memory": {}}
    line = []
    try:
        for rows, precision in [(r, p) for r in compare_rows for p in precisions]:
            files = ensure_data(root, rows)
            run = results["compare"][str(rows) if len(precisions) == 1 else f"{rows}-{precision}"] = {}
            job_extra = [*extra, f"predict.precision={precision}"]
            if not args.skip_plain:
                print(f"plain single-process loop over {len(files)} files ({rows} rows, {precision}) ...", flush=True)
                labeled = predictions.setdefault(rows, {}).setdefault(precision, [])
                run["plain"] = plain_loop(files, bundle_url, work / "plain", args.batch_size, precision, labeled)
                shutil.rmtree(work / "plain")
                if precision != precisions[0]:
                    run["plain"]["vs_" + precisions[0]] = agreement(predictions[rows][precisions[0]], labeled)
                print(f"  {run['plain']}", flush=True)
            print(f"jobs/label.py over the same {len(files)} files ({precision}) ...", flush=True)
            job = run["job"] = label_job(files, bundle_url, work / "job", job_extra, memory=False)
            print(f"  {job}", flush=True)
            text = (f"{rows} rows{'' if len(precisions) == 1 else ', ' + job['precision']}: job "
                    f"{job['labeling_pairs_per_s']} pairs/s ({job['end_to_end_pairs_per_s']} end to end)")
            if "plain" in run:
                run["ratio_labeling_phase"] = round(job["labeling_pairs_per_s"] / run["plain"]["pairs_per_s"], 2)
                run["ratio_end_to_end"] = round(job["end_to_end_pairs_per_s"] / run["plain"]["pairs_per_s"], 2)
                # A pipeline spending the loop's CPU per pair on all cores can at most be this much faster.
                run["ratio_ceiling"] = round(results["machine"]["cores"] / run["plain"]["cores_busy"], 2)
                text += (f" vs plain loop {run['plain']['pairs_per_s']} -> {run['ratio_labeling_phase']} "
                         f"({run['ratio_end_to_end']} end to end; target >= 1.3; the loop keeps "
                         f"{run['plain']['cores_busy']} cores busy, so at its CPU per pair {run['ratio_ceiling']} "
                         "is the most any pipeline gets)")
                if "vs_" + precisions[0] in run["plain"]:
                    agreed = run["plain"]["vs_" + precisions[0]]
                    text += (f"; top-1 agreement with {precisions[0]} {agreed['top1_agreement']:.2%}, scores within "
                             f"{agreed['max_top_k_score_diff']}, {run['plain']['rechecked_fp32']} rows rerun in fp32")
            line.append(text)
        for rows in memory_rows:
            print(f"jobs/label.py over {rows} rows (memory) ...", flush=True)
            run = results["memory"][str(rows)] = label_job(ensure_data(root, rows), bundle_url, work / "job", extra,
                                                           memory=True)
            print(f"  {run}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_at_end"] = load_average()

    peaks = {rows: r["peak_pss_mib"] for rows, r in results["memory"].items()}
    if len(peaks) >= 2:
        small, large = min(peaks, key=int), max(peaks, key=int)
        results["memory_ratio"] = round(peaks[large] / peaks[small], 2)
        line.append(f"peak memory {peaks[small]} MiB @ {small} rows, {peaks[large]} MiB @ {large} rows -> "
                    f"{results['memory_ratio']}x (target <= 1.2)")
    print("labeling " + "; ".join(line))
    print(f"results: {write_results('label_throughput' + (f'-{args.tag}' if args.tag else ''), results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
