"""Training: `jobs/train.py` (1 and 2 workers) beside a plain single-process PyTorch loop.

    python benchmarks/train_throughput.py [--pairs 4000] [--epochs 6] [--mode fusion] [--workers 1,2]

Inputs: the built-in sample (``raypipe.datasets.sample``, img2dataset Parquet shards), prepared once with
``jobs/prepare.py`` (64x64 images, 32 tokens) and cached under ``$TMPDIR/raypipe-bench/``; both
sides train on the same prepared training split.

Measured, in one process tree:

1. plain loop: what a user writes by hand. pyarrow reads the prepared Parquet into tensors once
   (``raypipe.tools.baselines.load_prepared``),
   then per epoch a random permutation, batches of ``--batch-size``, the same ``FusionClassifier``
   (the train job's default architecture), cross-entropy, Adam (lr 0.001). PyTorch uses its default
   intra-op threads (all cores).
2. the job: ``python jobs/train.py prepared=... scaling.num_workers=K`` as a user runs it (its own
   local Ray), same epochs, batch size (global) and model, no early stopping. Its per-epoch
   ``train_samples_per_s`` (training rows / training-phase seconds, slowest worker) comes from the
   bundle's metrics.json; the job's own epoch time also includes validation and the checkpoint.

Figure per side: the median training-phase samples/s over epochs 2..N (epoch 1 pays start-up:
Ray Data's first execution, torch's first kernels). Ratios: job / plain loop (target >= 0.9) and
2 workers / 1 worker (target > 1). Prints one summary line; JSON in benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `common` when run as a script

from common import ProcessSampler, env_pairs, load_average, machine_info, rate, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def ensure_prepared(root: Path, pairs: int) -> Path:
    """A prepare output of the built-in sample with ``pairs`` pairs (made once, then reused)."""
    from raypipe.datasets.sample import SampleSpec, write_sample

    prepared = root / "prepared"
    if (prepared / "stats.json").exists():
        return prepared
    print(f"writing and preparing the sample ({pairs} pairs) under {root} ...", flush=True)
    write_sample(str(root / "shards"), SampleSpec(num_pairs=pairs, image_size=(256, 192)), formats=("parquet",))
    subprocess.run(
        [sys.executable, str(REPO / "jobs" / "prepare.py"), f"data.input={root / 'shards' / 'parquet'}",
         f"output={prepared}", "overwrite=true", "ray.progress_bars=false"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return prepared


def plain_loop(prepared: Path, mode: str, epochs: int, batch_size: int, seed: int = 0) -> dict:
    """One process, no Ray: the training loop a user writes by hand over in-memory tensors."""
    import torch

    from raypipe.tools.baselines import load_prepared
    from raypipe.config import ModelSection
    from raypipe.model import FusionClassifier, ModelConfig
    from raypipe.transforms.split import TRAIN
    from raypipe.transforms.vocab import Vocabulary

    splits, classes = load_prepared(str(prepared))
    train = splits[TRAIN]
    images, tokens, labels = (torch.from_numpy(a) for a in (train.images, train.tokens.astype("int64"),
                                                             train.labels.astype("int64")))  # as the job feeds them
    vocab = Vocabulary.from_json((prepared / "vocab.json").read_text())
    settings = {**ModelSection().model_dump(), "mode": mode}
    torch.manual_seed(seed)
    model = FusionClassifier(ModelConfig(num_classes=len(classes), vocab_size=len(vocab), **settings))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    loss_fn = torch.nn.CrossEntropyLoss()
    per_epoch = []
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        for index in torch.randperm(len(labels)).split(batch_size):
            loss = loss_fn(model(images[index], tokens[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        per_epoch.append(rate(len(labels), time.perf_counter() - started))
    return {"rows": len(labels), "threads": torch.get_num_threads(), "samples_per_s_by_epoch": per_epoch,
            "samples_per_s": statistics.median(per_epoch[1:] or per_epoch)}


def train_job(prepared: Path, workers: int, args, storage: Path) -> dict:
    """``python jobs/train.py`` in a subprocess (its own local Ray cluster)."""
    mode, epochs, batch_size = args.mode, args.epochs, args.batch_size
    name = f"bench-{mode}-w{workers}"
    cmd = [sys.executable, str(REPO / "jobs" / "train.py"), f"prepared={prepared}", f"model.mode={mode}",
           f"scaling.num_workers={workers}", f"optim.epochs={epochs}", f"optim.batch_size={batch_size}",
           "optim.early_stopping_patience=null", f"run.storage_path={storage}", f"run.name={name}",
           "ray.progress_bars=false", *args.job_arg]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **args.env}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with ProcessSampler(proc.pid) as sampler:
        log, _ = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(log[-4000:])
        raise SystemExit(f"the training job failed (exit {proc.returncode}): {' '.join(cmd[:4])} ...")
    history = json.loads((storage / name / "bundle" / "metrics.json").read_text())["history"]
    per_epoch = [round(h["train_samples_per_s"], 1) for h in history]
    with_validation = [rate(h["train_rows"], h["epoch_seconds"]) for h in history]
    return {
        "workers": workers,
        "rows": history[-1]["train_rows"],
        "samples_per_s_by_epoch": per_epoch,
        "samples_per_s": statistics.median(per_epoch[1:] or per_epoch),
        "samples_per_s_incl_validation_and_checkpoint": statistics.median(with_validation[1:] or with_validation),
        "wall_s": round(wall, 1),
        "tree_cpu_s": round(sampler.cpu_s, 1),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4000, help="sample pairs (80%% of them train)")
    p.add_argument("--epochs", type=int, default=6, help="epochs per side (the first is not counted)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size, both sides (the paper: 32)")
    p.add_argument("--mode", default="fusion", choices=["fusion", "image", "text"])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts for the job")
    p.add_argument("--data-dir", help="where the prepared sample is cached (default: $TMPDIR/raypipe-bench/train-...)")
    p.add_argument("--skip-plain", action="store_true", help="only the job (e.g. to try a setting)")
    p.add_argument("--job-arg", action="append", default=[], help="extra section.field=value for the job")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment of the job (and its Ray)")
    p.add_argument("--tag", help="results file suffix: train_throughput-<tag>.json")
    args = p.parse_args(argv)
    args.env = env_pairs(args.env, p.error)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Path(tempfile.gettempdir()) / "raypipe-bench"
    root = Path(args.data_dir) if args.data_dir else bench / f"train-n{args.pairs}"
    prepared = ensure_prepared(root, args.pairs)
    results: dict = {"machine": machine_info(), "mode": args.mode, "epochs": args.epochs, "batch_size": args.batch_size,
                     "prepared": str(prepared), "job_args": args.job_arg, "env": args.env}
    if not args.skip_plain:
        print(f"plain single-process loop, {args.epochs} epochs ...", flush=True)
        results["plain"] = plain_loop(prepared, args.mode, args.epochs, args.batch_size)
        print(f"  {results['plain']}", flush=True)
    storage = Path(tempfile.mkdtemp(prefix="train-runs-", dir=bench))
    results["jobs"] = {}
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            print(f"jobs/train.py with {workers} worker(s) ...", flush=True)
            results["jobs"][workers] = train_job(prepared, workers, args, storage)
            print(f"  {results['jobs'][workers]}", flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    results["load_average_at_end"] = load_average()

    jobs = {workers: run["samples_per_s"] for workers, run in results["jobs"].items()}
    line = [f"training {args.mode}"]
    plain = results.get("plain", {}).get("samples_per_s")
    if plain:
        results["ratios_to_plain"] = {workers: round(v / plain, 2) for workers, v in jobs.items()}
        line.append(f"plain loop {plain} samples/s")
    for workers, v in jobs.items():
        ratio = f" ({results['ratios_to_plain'][workers]}x the plain loop; target >= 0.9)" if plain else ""
        line.append(f"job with {workers} worker(s) {v} samples/s{ratio}")
    if {1, 2} <= jobs.keys():
        results["ratio_2_to_1_workers"] = round(jobs[2] / jobs[1], 2)
        line.append(f"2 workers / 1 worker {results['ratio_2_to_1_workers']} (target > 1)")
    print("; ".join(line))
    print(f"results: {write_results('train_throughput' + (f'-{args.tag}' if args.tag else ''), results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
