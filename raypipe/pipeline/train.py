"""`train`: the fusion model on Ray Train (TorchTrainer, DDP), with checkpoints at epoch ends (and every
``run.checkpoint_every_steps`` steps), resume, and a model bundle from the best epoch.

Data comes from a `prepare` output (decoded once) or is streamed from raw shards through the
prepare stage. Each worker reads its shard with ``get_dataset_shard(...).iter_torch_batches``;
validation metrics are summed over workers (all-reduce of the confusion matrix), so every worker
takes the same early-stopping decision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from raypipe import calibration, schema
from raypipe.bundle import Bundle, save_bundle
from raypipe.console import say
from raypipe.config import OptimSection, TrainConfig, dump_config, flat_config
from raypipe.errors import UserError
from raypipe.io import fs as rfs
from raypipe.metrics import summary
from raypipe.model import BRANCH_KEYS, FusionClassifier, ModelConfig, late_sum
from raypipe.pipeline.capacity import cluster_capacity, plan_worker_resources, wait_for_resources
from raypipe.pipeline.cluster import start_cluster, wait_for_free_cpus
from raypipe.pipeline.mlflow_log import MlflowRun, end_run, log_bundle, log_epoch, open_run, require_mlflow
from raypipe.pipeline.prepare import (
    PreparedOutput, build_vocab_and_classes, input_paths, plan_prepare, prepared_dataset,
)
from raypipe.transforms.image import ImageOptions
from raypipe.transforms.split import TRAIN, VAL, rows_of_split
from raypipe.transforms.text import TextOptions
from raypipe.transforms.vocab import Vocabulary

log = logging.getLogger(__name__)

MODEL_COLUMNS = [schema.IMAGE, schema.TOKENS, schema.LABEL_ID]
BUNDLE_DIR = "bundle"
TENSORBOARD_DIR = "tensorboard"
# Checkpoint files: the current state (to resume) and the best weights so far (for the bundle).
CKPT_MODEL, CKPT_OPTIMIZER, CKPT_BEST, CKPT_PROGRESS = "model.pt", "optimizer.pt", "best_model.pt", "progress.json"
CKPT_SCALER, CKPT_RNG, CKPT_EMA = "scaler.pt", "rng.pt", "ema_model.pt"
# In the run folder: the settings of the run's latest start, and Ray Train's record of the run's checkpoints
# (whose presence makes a start with the run's name resume them).
RUN_SETTINGS, CHECKPOINT_SNAPSHOT = "train_config.json", "checkpoint_manager_snapshot.json"
# The settings a resumed run may change: how long and how it trains, not what it trains.
RESUMABLE_CHANGES = ("optim.epochs", "optim.early_stopping_patience", "scaling.", "run.", "ray.", "storage.")
# CheckpointPayload's tensors: attribute -> file.
CKPT_TENSORS = {"model": CKPT_MODEL, "optimizer": CKPT_OPTIMIZER, "scaler": CKPT_SCALER, "best": CKPT_BEST,
                "rng": CKPT_RNG, "ema": CKPT_EMA}
CKPT_OPTIONAL = ("scaler", "rng", "ema")  # absent from older checkpoints; the average only with optim.ema_decay


class TrainError(UserError, RuntimeError):
    """A training run that cannot start; the message says why and what to change."""


@dataclass
class TrainingData:
    train: object  # ray.data.Dataset of (image, tokens, label_id)
    val: object
    vocab: Vocabulary
    classes: tuple[str, ...]
    image: ImageOptions
    text: TextOptions
    class_counts: dict[str, int]
    train_rows: int | None = None  # known before training only for a prepare output (its stats)


SPLIT_INPUT_COLUMNS = [*MODEL_COLUMNS, schema.STATUS, schema.SPLIT]


def _split_datasets(ds) -> tuple[object, object]:
    ds = ds.select_columns(SPLIT_INPUT_COLUMNS)
    return tuple(
        ds.map_batches(schema.Typed(rows_of_split), fn_args=(s, True, MODEL_COLUMNS), batch_format="numpy")
        for s in (TRAIN, VAL)
    )


def check_trainable(source: str, class_counts: dict[str, int], train_rows: int | None) -> None:
    """Refuses data a classifier cannot be trained on: no usable training row, or one class only."""
    if train_rows == 0:
        raise TrainError(f"{source} has no usable row in the training split; see its stats.json (by_status) and "
                         "the split settings (split.val_fraction)")
    seen = sorted(name for name, count in class_counts.items() if count > 0)
    if len(seen) < 2:
        raise TrainError(f"{source} has labeled rows of {len(seen)} class(es) ({seen}); a classifier needs two or "
                         "more. Check labels.column / labels.classes, or the input")


def load_training_data(cfg: TrainConfig) -> TrainingData:
    """From a prepare output, or streamed from raw shards. Starts Ray only after the checks."""
    if cfg.prepared is None:
        plan = plan_prepare(cfg)
        start_cluster(cfg.ray, cfg.storage, {**input_paths(cfg), "run.storage_path": cfg.run.storage_path})
        vocab, classes, label_counts = build_vocab_and_classes(plan)
        check_trainable(", ".join(cfg.data.input), label_counts, None)
        train, val = _split_datasets(prepared_dataset(plan, vocab, classes))
        return TrainingData(train, val, vocab, classes, cfg.image, cfg.text, label_counts)

    prepared = PreparedOutput.open(rfs.resolve(cfg.prepared, cfg.storage))
    if not prepared.classes:
        raise TrainError(f"{cfg.prepared} has no classes (prepared with labels.source=none?); training needs labels")
    train_rows = prepared.stats.get("ok_by_split", {}).get(TRAIN, 0)
    check_trainable(cfg.prepared, prepared.stats.get("ok_by_class", {}), train_rows)
    start_cluster(cfg.ray, cfg.storage, {"prepared": cfg.prepared, "run.storage_path": cfg.run.storage_path})
    train, val = _split_datasets(prepared.rows(SPLIT_INPUT_COLUMNS))
    decoded_mib = prepared.stats.get("rows_ok", 0) * decoded_row_bytes(prepared.image, prepared.text) / 2**20
    if cfg.scaling.cache_mib and decoded_mib <= cfg.scaling.cache_mib:
        log.info("caching the %.0f MiB of prepared rows in the object store (scaling.cache_mib=%d)",
                 decoded_mib, cfg.scaling.cache_mib)
        train, val = cached(train), cached(val)
    return TrainingData(
        train, val, prepared.vocab, prepared.classes, prepared.image, prepared.text,
        prepared.stats.get("ok_by_class", {}), train_rows,
    )


def cached(ds):
    """The dataset's blocks computed once and kept in the object store, as ``Dataset.materialize()``
    does, but executed once: materialize runs a second, empty execution right after the first, and
    that one checks for free CPUs before Ray's resource view has seen the first release them (then
    warns, falsely, that the job will hang)."""
    import ray.data

    wait_for_free_cpus()
    return ray.data.from_arrow_refs(ds.to_arrow_refs())


def decoded_row_bytes(image: ImageOptions, text: TextOptions) -> int:
    """Object-store bytes of one training row (MODEL_COLUMNS): uint8 pixels, int64 token ids, the label id."""
    return image.size * image.size * 3 + text.max_len * 8 + 8


def class_weights(classes: tuple[str, ...], counts: dict[str, int]) -> list[float]:
    """Inverse-frequency weights, mean 1 over the classes seen (sklearn's 'balanced')."""
    n = np.array([counts.get(c, 0) for c in classes], dtype=np.float64)
    weights = np.where(n > 0, n.sum() / (len(classes) * np.maximum(n, 1)), 0.0)
    return weights.tolist()


def augment_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> the same images, each flipped left-right with probability 1/2 and
    shifted by up to S/16 pixels each way; pixels shifted in repeat the edge (white stays white)."""
    B, S = images.shape[:2]
    shift = max(1, S // 16)
    dy, dx = torch.randint(-shift, shift + 1, (2, B, 1), generator=generator)  # [B, 1] each
    flip = torch.rand(B, 1, generator=generator) < 0.5
    grid = torch.arange(S)
    rows = (grid + dy).clamp(0, S - 1)  # [B, S]
    cols = (grid + dx).clamp(0, S - 1)
    cols = torch.where(flip, S - 1 - cols, cols)
    rows, cols = rows.to(images.device), cols.to(images.device)
    return images[torch.arange(B, device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


# --- inside each Ray Train worker ------------------------------------------------------------


def _all_reduce(*tensors: torch.Tensor, maximum: bool = False) -> None:
    """Sums (or maxima) over workers, in place; a no-op in a single process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if maximum else dist.ReduceOp.SUM)


def shuffled_batches(chunks, batch_size: int, buffer_rows: int, generator: torch.Generator):
    """Batches of rows drawn at random from a pool of at least ``buffer_rows`` rows (the pool of
    Ray's local shuffle buffer), refilled from ``chunks`` (dicts of tensors) as it drains; every row
    comes out exactly once. The pool is permuted once per refill, in torch; Ray's own buffer samples
    every batch in Arrow, which at batch 32 on 1 CPU worker cost 17% of the samples/s against no
    shuffle (300 vs 360), this 9% (327; benchmarks/train_throughput.py)."""
    pool: dict[str, torch.Tensor] | None = None
    for chunk in chunks:
        pool = chunk if pool is None else {k: torch.cat((pool[k], chunk[k])) for k in chunk}
        drawn = (len(pool[schema.LABEL_ID]) - buffer_rows) // batch_size * batch_size
        if drawn > 0:
            pool = yield from _draw(pool, drawn, batch_size, generator)
    if pool is not None:
        yield from _draw(pool, len(pool[schema.LABEL_ID]), batch_size, generator)


def _draw(pool: dict[str, torch.Tensor], rows_out: int, batch_size: int, generator: torch.Generator):
    """Yields ``rows_out`` rows of ``pool`` drawn at random, in batches; returns the rows left."""
    order = torch.randperm(len(pool[schema.LABEL_ID]), generator=generator).to(pool[schema.LABEL_ID].device)
    for start in range(0, rows_out, batch_size):
        yield {k: v[order[start:min(start + batch_size, rows_out)]] for k, v in pool.items()}
    return {k: v[order[rows_out:]] for k, v in pool.items()}


def _batches(shard, batch_size: int, device, shuffle_buffer: int = 0, generator: torch.Generator | None = None):
    """The worker's shard in batches of ``batch_size``, shuffled through a buffer of
    ``shuffle_buffer`` rows (0: in storage order)."""
    shuffle = shuffle_buffer > 0
    batches = shard.iter_torch_batches(
        batch_size=max(shuffle_buffer, batch_size) if shuffle else batch_size,  # chunks to refill the pool with
        dtypes={schema.IMAGE: torch.uint8, schema.TOKENS: torch.int64, schema.LABEL_ID: torch.int64},
        device=device,
    )
    return shuffled_batches(batches, batch_size, shuffle_buffer, generator) if shuffle else batches


def skip_rows(batches, rows: int):
    """``batches`` (dicts of equally long tensors) without their first ``rows`` rows."""
    for batch in batches:
        if rows > 0:
            size = len(next(iter(batch.values())))
            if size <= rows:
                rows -= size
                continue
            batch = {k: v[rows:] for k, v in batch.items()}
            rows = 0
        yield batch


def rows_to_skip(rows_done: int, world: int) -> int:
    """Rows each worker leaves out when it goes on with an epoch of which all workers together trained
    ``rows_done`` (the shards are split evenly, and every worker takes as many steps)."""
    return rows_done // world


def step_checkpoint_due(steps: int, every: int | None) -> bool:
    """After the run's ``steps``-th optimizer step, with run.checkpoint_every_steps = ``every``."""
    return every is not None and steps % every == 0


def checkpoint_name(epoch: int, steps: int, epoch_end: bool) -> str:
    """``checkpoint_epoch0002_step00000040``: taken inside epoch 2 after the run's 40th step, ``..._end``
    at the end of the epoch; sorting the names sorts the checkpoints by the time they were taken."""
    return f"checkpoint_epoch{epoch:04d}_step{steps:08d}" + ("_end" if epoch_end else "")


@dataclass(frozen=True)
class EpochSoFar:
    """The training done in an epoch so far, over all workers: what a step checkpoint records so that a
    restart goes on with the epoch instead of starting it again."""

    epoch: int  # from 0
    steps: int
    rows: int
    loss_sum: float  # loss x rows
    seconds: float  # training time, of the slowest worker

    @classmethod
    def resumed(cls, saved: dict | None, epoch: int) -> EpochSoFar:
        """What a checkpoint taken inside ``epoch`` recorded (``saved``), else nothing done yet."""
        return cls(**saved) if saved and saved["epoch"] == epoch else cls(epoch, 0, 0, 0.0, 0.0)


@dataclass
class CheckpointPayload:
    """What a checkpoint holds: everything a worker needs to go on from the step it was taken at."""

    model: dict  # the module's state_dict
    optimizer: dict
    scaler: dict  # GradScaler's (empty when fp16 loss scaling is off)
    best: dict | None  # the weights of the best epoch so far (None before the first epoch ends)
    progress: dict  # epochs done, history, best epoch, steps; inside an epoch "in_epoch" (an EpochSoFar)
    rng: list[dict]  # per rank: torch's random generator(s) and the augmenter's
    ema: dict | None = None  # optim.ema_decay: the moving average of the weights (None when off)

    def save(self, directory: str) -> None:
        for attribute, name in CKPT_TENSORS.items():
            if getattr(self, attribute) is not None or attribute not in CKPT_OPTIONAL:
                torch.save(getattr(self, attribute), os.path.join(directory, name))
        Path(directory, CKPT_PROGRESS).write_text(json.dumps(self.progress))

    @classmethod
    def load(cls, directory: str) -> CheckpointPayload:
        def load(attribute: str):
            return torch.load(os.path.join(directory, CKPT_TENSORS[attribute]), weights_only=True)

        # A run checkpointed by a raypipe that saved neither the scaler nor the generators goes on without.
        optional = {a: load(a) for a in CKPT_OPTIONAL if os.path.exists(os.path.join(directory, CKPT_TENSORS[a]))}
        return cls(model=load("model"), optimizer=load("optimizer"), scaler=optional.get("scaler", {}),
                   best=load("best"), progress=json.loads(Path(directory, CKPT_PROGRESS).read_text()),
                   rng=optional.get("rng", []), ema=optional.get("ema"))


def _gather(value, world: int) -> list:
    """``value`` of every worker, in rank order (the process group is up once the model is prepared)."""
    if world == 1:
        return [value]
    values = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


@dataclass(frozen=True)
class LoopConfig:
    """What every training worker gets from the driver: the job's settings and what the data decided."""

    model: ModelConfig
    optim: OptimSection
    amp: bool  # scaling.amp
    torch_threads: int | None  # scaling.torch_threads
    class_weights: list[float] | None  # optim.class_weighting=balanced: from the training split's counts
    train_rows: int | None  # rows of the training split when known before the first epoch (prepare's stats)
    progress_interval_s: float  # run.progress_interval_s
    tensorboard: rfs.Location | None  # where rank 0 puts its event files (run.tensorboard)
    checkpoint_every_steps: int | None  # run.checkpoint_every_steps
    mlflow: MlflowRun | None  # the MLflow run rank 0 logs each epoch to (run.mlflow_tracking_uri)


@dataclass
class WorkerState:
    """One worker's model, optimizer and run progress (what a checkpoint holds), and its place in the group."""

    loop: LoopConfig
    rank: int
    world: int
    device: torch.device
    raw_model: FusionClassifier  # the module itself, for checkpoints and the bundle
    model: torch.nn.Module  # wrapped for DDP
    optimizer: torch.optim.Optimizer
    progress: dict
    best_state: dict | None
    augmenter: torch.Generator | None  # optim.augment: the random flips and shifts, one stream per worker
    ema: dict[str, torch.Tensor] | None = None  # optim.ema_decay: the moving average of raw_model's state
    scaler: torch.amp.GradScaler = field(init=False)  # fp16 loss scaling (off unless AMP runs in fp16)

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    @property
    def use_amp(self) -> bool:
        return self.loop.amp and self.device.type == "cuda"

    @property
    def loss_weights(self) -> tuple[float, float]:
        return loss_weights(self.loop.model, self.loop.optim)

    @property
    def separate(self) -> bool:
        return trains_branches_separately(self.loop.model, self.loop.optim)

    @property
    def amp_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16

    @property
    def precision(self) -> str:
        """What the forward passes of training and validation ran in: recorded in the bundle."""
        return ("bf16" if self.amp_dtype == torch.bfloat16 else "fp16") if self.use_amp else "fp32"


def _set_threads(loop: LoopConfig, device: torch.device, local_world: int) -> None:
    if device.type == "cpu":
        # Ray sets OMP_NUM_THREADS to the CPUs reserved (1 here), but CPU training is bound by torch's
        # intra-op threads; the CPU kept free for Ray Data is mostly idle once the data is prepared.
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(loop.torch_threads or max(1, cores // local_world))


def new_progress() -> dict:
    """The progress of a run that has not trained yet (the keys a checkpoint's progress.json holds)."""
    return {"epoch": 0, "steps": 0, "history": [], "best_epoch": None, "best_score": None, "stale_epochs": 0,
            "resumed_mid_epoch": [],
            # optim.branch_training=separate: each branch's best epoch, and the model of the two at the end
            "best_branches": {branch: {"epoch": None, "score": None} for branch in BRANCH_KEYS},
            "assembled": None}


def _rng_state(state: WorkerState) -> dict:
    return {
        "torch": torch.get_rng_state(),  # dropout
        "cuda": torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None,
        "augmenter": state.augmenter.get_state() if state.augmenter is not None else None,
    }


def _set_rng_state(state: WorkerState, saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and state.device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda"], state.device)
    if saved["augmenter"] is not None and state.augmenter is not None:
        state.augmenter.set_state(saved["augmenter"])


def resume_message(progress: dict) -> str:
    in_epoch = progress.get("in_epoch")
    if in_epoch is None:
        return f"resuming from the checkpoint after epoch {progress['epoch']}"
    return (f"resuming from the checkpoint at step {in_epoch['steps']} of epoch {in_epoch['epoch'] + 1} "
            f"({in_epoch['rows']:,} rows trained); the epoch goes on with the rows after those")


def build_worker(loop: LoopConfig) -> WorkerState:
    """Model, optimizer and loss scaler, restored from the run's last checkpoint when there is one (with
    the random generators, when the number of workers is the same), the model wrapped for DDP (NCCL on
    GPU, gloo on CPU)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(loop.optim.seed + rank)
    device = ray.train.torch.get_device()
    _set_threads(loop, device, context.get_local_world_size())
    raw_model = FusionClassifier(loop.model)
    progress, saved = new_progress(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            saved = CheckpointPayload.load(directory)
        raw_model.load_state_dict(saved.model)
        progress = {**progress, **saved.progress}
        if rank == 0:
            say(resume_message(progress))
        if progress.get("in_epoch"):
            in_epoch = progress["in_epoch"]
            progress["resumed_mid_epoch"].append({"epoch": in_epoch["epoch"] + 1, "steps": in_epoch["steps"],
                                                  "rows": in_epoch["rows"]})
    model = ray.train.torch.prepare_model(raw_model)
    optimizer = torch.optim.Adam(model.parameters(), lr=loop.optim.lr, weight_decay=loop.optim.weight_decay)
    # Where this attempt's workers run, and how many attempts the run took (a restart after a failure
    # resumes from the checkpoint): recorded in the bundle's metrics.
    progress["worker_nodes"] = _gather(ray.get_runtime_context().get_node_id(), world)
    progress["attempts"] = progress.get("attempts", 0) + 1
    augmenter = torch.Generator().manual_seed(loop.optim.seed * 1000 + rank) if loop.optim.augment else None
    ema = None
    if loop.optim.ema_decay is not None:
        ema = saved.ema if saved is not None and saved.ema is not None else _weights(raw_model)
        ema = {k: v.to(device) for k, v in ema.items()}
    state = WorkerState(loop, rank, world, device, raw_model, model, optimizer, progress,
                        saved.best if saved else None, augmenter, ema)
    if saved is not None:
        optimizer.load_state_dict(saved.optimizer)
        if saved.scaler:  # empty when it was saved by a scaler that was off
            state.scaler.load_state_dict(saved.scaler)
        if len(saved.rng) == world:
            _set_rng_state(state, saved.rng[rank])
    return state


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def progress_line(epoch: int, epochs: int, rows: int, expected_rows: int | None, loss: float, elapsed_s: float) -> str:
    """One progress line inside an epoch. ``rows`` and ``expected_rows`` count all workers; the time left
    assumes the rate so far (and, for the run, epochs as long as this one)."""
    rate = rows / max(elapsed_s, 1e-9)
    line = f"  epoch {epoch}/{epochs}  {rows:,}"
    if expected_rows:
        epoch_left = max(expected_rows - rows, 0) / max(rate, 1e-9)
        run_left = epoch_left + (epochs - epoch) * expected_rows / max(rate, 1e-9)
        line += f"/{expected_rows:,} rows ({100 * rows / expected_rows:.0f}%)"
        tail = f"  epoch left ~{_duration(epoch_left)}, run left ~{_duration(run_left)}"
    else:
        line += " rows"
        tail = ""
    return f"{line}  loss {loss:.4f}  {rate:,.0f} samples/s{tail}"


class TensorBoardLog:
    """Rank 0's TensorBoard event files: written locally (the run directory may be object storage) and
    copied to the run's ``tensorboard`` folder after every epoch. A resumed run adds a file of its own,
    which TensorBoard shows as the same run."""

    SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "loss/val_calibrated": "val_nll_calibrated",
               "accuracy/val": "val_accuracy", "macro_f1/val": "val_macro_f1",
               "throughput/train_samples_per_s": "train_samples_per_s"}

    def __init__(self, target: rfs.Location):
        from torch.utils.tensorboard import SummaryWriter

        self.target = target
        self.local = tempfile.mkdtemp(prefix="raypipe-tensorboard-")
        self.writer = SummaryWriter(self.local)

    def epoch(self, metrics: dict, lr: float) -> None:
        step = metrics["epoch"]
        for tag, key in self.SCALARS.items():
            self.writer.add_scalar(tag, metrics[key], step)
        self.writer.add_scalar("lr", lr, step)
        self.writer.flush()
        for name in os.listdir(self.local):
            rfs.write_bytes(self.target.join(name), Path(self.local, name).read_bytes())


def trains_branches_separately(model: ModelConfig, optim: OptimSection) -> bool:
    return model.late_fusion and optim.branch_training == "separate"


def loss_weights(model: ModelConfig, optim: OptimSection) -> tuple[float, float]:
    """(weight of the fused logits' loss, weight of each branch classifier's loss)."""
    if trains_branches_separately(model, optim):
        return 0.0, 1.0
    return 1.0, optim.aux_loss_weight if model.mode == "fusion" and model.aux_heads else 0.0


def train_step(model, optimizer, scaler, loss_fn, images, tokens, labels, weights: tuple[float, float],
               amp_dtype: torch.dtype | None) -> torch.Tensor:
    """One optimizer step on a batch, under autocast in ``amp_dtype`` when given (the weights stay fp32;
    losses are taken on fp32 logits); ``weights``: ``loss_weights``'. Returns the loss."""
    fused_weight, branch_weight = weights
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits, branch_logits = model(images, tokens, with_branches=True)
        losses = [fused_weight * loss_fn(logits.float(), labels)] if fused_weight else []
        losses += [branch_weight * loss_fn(x.float(), labels) for x in branch_logits] if branch_weight else []
        loss = sum(losses)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_epoch(state: WorkerState, shard, before: EpochSoFar, loss_fn) -> EpochSoFar:
    """One pass over this worker's training shard for the epoch of ``before``, past the rows ``before``
    counts (those an interrupted attempt trained; none in a new epoch), with a step checkpoint every
    run.checkpoint_every_steps steps; returns the epoch's training over all workers. Every worker calls
    it (the checkpoints and the sums are collectives)."""
    optim = state.loop.optim
    epoch = before.epoch
    state.model.train()
    sums = torch.zeros(2, dtype=torch.float64, device=state.device)  # [loss x rows, rows]: this worker, this attempt
    shuffler = torch.Generator().manual_seed(optim.seed * 1_000_003 + epoch * 1009 + state.rank)
    batch_size = max(1, optim.batch_size // state.world)
    history = state.progress["history"]
    expected_rows = history[-1]["train_rows"] if history else state.loop.train_rows
    # Skipped after the shuffle, which is seeded per epoch: a shard streamed in the same order as in the
    # interrupted attempt gives exactly the rows that attempt had not trained.
    batches = skip_rows(_batches(shard, batch_size, state.device, optim.shuffle_buffer, shuffler),
                        rows_to_skip(before.rows, state.world))
    started = last_line = time.perf_counter()
    steps = 0
    for batch in batches:
        labels = batch[schema.LABEL_ID]
        images = batch[schema.IMAGE]
        if state.augmenter is not None:
            images = augment_images(images, state.augmenter)
        loss = train_step(state.model, state.optimizer, state.scaler, loss_fn, images, batch[schema.TOKENS], labels,
                          state.loss_weights, state.amp_dtype if state.use_amp else None)
        sums += torch.tensor([loss.item() * len(labels), len(labels)], dtype=torch.float64, device=state.device)
        steps += 1
        state.progress["steps"] += 1
        if state.ema is not None:
            update_ema(state.ema, state.raw_model, optim.ema_decay, state.progress["steps"])
        now = time.perf_counter()
        if step_checkpoint_due(state.progress["steps"], state.loop.checkpoint_every_steps):
            save_step_checkpoint(state, _epoch_so_far(state, before, sums, steps, now - started))
        if state.rank == 0 and now - last_line >= state.loop.progress_interval_s:
            last_line = now  # this worker's rows x workers: the shards are split evenly
            rows = before.rows + int(sums[1]) * state.world
            loss_so_far = (before.loss_sum + float(sums[0]) * state.world) / max(rows, 1)
            say(progress_line(epoch + 1, optim.epochs, rows, expected_rows, loss_so_far, before.seconds + now - started))
    return _epoch_so_far(state, before, sums, steps, time.perf_counter() - started)


def _epoch_so_far(state: WorkerState, before: EpochSoFar, sums: torch.Tensor, steps: int, seconds: float) -> EpochSoFar:
    """``before`` plus what every worker trained in this attempt (``sums`` and ``seconds`` of this one)."""
    total = sums.clone()
    slowest = torch.tensor([seconds], dtype=torch.float64, device=state.device)
    _all_reduce(total)
    _all_reduce(slowest, maximum=True)
    return EpochSoFar(before.epoch, before.steps + steps, before.rows + int(total[1]),
                      before.loss_sum + float(total[0]), before.seconds + float(slowest[0]))


def validate(state: WorkerState, shard) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The validation split over all workers (every worker calls it: the sums are all-reduced): [summed loss,
    rows] and the confusion matrix (true x predicted) of the model as it would be bundled, and
    ``calibration.fit``'s answer. A late-fusion model takes two passes: the first fits its image share (with
    the temperature), the second scores the model at that share."""
    n = state.loop.model.num_classes
    state.model.eval()
    late, fitted = state.loop.model.late_fusion, None
    nll, bins = calibration.empty_sums(len(calibration.IMAGE_SHARES) if late else 1, state.device)
    if late:
        for image, tokens, labels in _validation_batches(state, shard):
            calibration.accumulate(nll, bins, calibration.share_logits(*state.raw_model.branch_logits(image, tokens)),
                                   labels)
        _all_reduce(nll, bins)
        fitted = calibration.fit(nll, bins)
    sums = torch.zeros(2, dtype=torch.float64, device=state.device)
    confusion = torch.zeros(n, n, dtype=torch.int64, device=state.device)
    for image, tokens, labels in _validation_batches(state, shard):
        if late:
            logits = late_sum(*state.raw_model.branch_logits(image, tokens), fitted["image_share"]).float()
        else:
            logits = state.model(image, tokens).float()
            calibration.accumulate(nll, bins, logits, labels)
        sums += torch.tensor(
            [torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item(), len(labels)],
            dtype=torch.float64, device=state.device,
        )
        confusion += torch.bincount(labels * n + logits.argmax(1), minlength=n * n).view(n, n)
    if not late:
        _all_reduce(nll, bins)
        fitted = calibration.fit(nll, bins)
    _all_reduce(sums, confusion)
    return sums, confusion, fitted


def _validation_batches(state: WorkerState, shard):
    """(images, tokens, labels) of this worker's validation shard, under no_grad and the run's autocast."""
    batch_size = 4 * max(1, state.loop.optim.batch_size // state.world)
    with torch.no_grad(), torch.autocast(state.device.type, dtype=state.amp_dtype, enabled=state.use_amp):
        for batch in _batches(shard, batch_size, state.device):
            yield batch[schema.IMAGE], batch[schema.TOKENS], batch[schema.LABEL_ID]


def validation_metrics(val_sums, confusion, fitted: dict) -> dict:
    """What ``validate`` measured, over all workers; ``fitted``: ``calibration.fit``'s."""
    scores = summary(confusion.cpu().numpy())
    return {
        "val_loss": float(val_sums[0] / max(val_sums[1], 1)),
        "val_accuracy": scores["accuracy"],
        "val_macro_f1": scores["macro_f1"],
        "val_rows": int(val_sums[1]),
        "temperature": fitted["temperature"],  # of least validation NLL, for these weights
        "val_nll_calibrated": fitted["nll_calibrated"],  # the validation NLL at that temperature (and share)
        "image_share": fitted["image_share"],  # late fusion: fitted with the temperature (None otherwise)
        # Late fusion: accuracy at share 0.5 (the plain sum), 1 (the image branch alone) and 0 (the text branch)
        **{f"val_accuracy_{name}": fitted[f"accuracy_{name}"] for name in ("plain_sum", "image", "text")},
        **{f"val_nll_calibrated_{name}": fitted[f"nll_calibrated_{name}"] for name in ("image", "text")},
        "val_ece": fitted["ece"],
        "val_ece_calibrated": fitted["ece_calibrated"],
    }


def epoch_metrics(trained: EpochSoFar, validated: dict, epoch_seconds: float) -> dict:
    """The epoch's metrics over all workers: training, and ``validation_metrics``' answer."""
    return {
        "epoch": trained.epoch + 1,
        "train_loss": trained.loss_sum / max(trained.rows, 1),
        "train_samples_per_s": trained.rows / max(trained.seconds, 1e-9),
        "epoch_seconds": round(epoch_seconds, 2),
        "train_rows": trained.rows,
        **validated,
    }


def epoch_score(metrics: dict, best_epoch_by: str, branch: str | None = None) -> float:
    """How good the epoch's weights (or one branch's) are by optim.best_epoch_by; higher is better."""
    suffix = f"_{branch}" if branch else ""
    if best_epoch_by == "val_accuracy":
        return metrics[f"val_accuracy{suffix}"]
    return -metrics[f"val_nll_calibrated{suffix}"]


def record(state: WorkerState, metrics: dict) -> tuple[bool, bool]:
    """Adds the epoch to the run's progress, keeps the best weights (by ``epoch_score``); returns (improved,
    stop early). Branches trained separately keep each its own best epoch's weights, by its own score, and the
    run stops when neither has improved for early_stopping_patience epochs."""
    progress, optim, epoch = state.progress, state.loop.optim, metrics["epoch"]
    if state.separate:
        improved = False
        for branch, best in progress["best_branches"].items():
            score = epoch_score(metrics, optim.best_epoch_by, branch)
            if best["score"] is None or score > best["score"]:
                best.update(epoch=epoch, score=score)
                state.best_state = {**(state.best_state or {}), **_weights(state.raw_model, BRANCH_KEYS[branch])}
                improved = True
        progress["stale_epochs"] = epoch - max(best["epoch"] for best in progress["best_branches"].values())
    else:
        score = epoch_score(metrics, optim.best_epoch_by)
        improved = progress["best_score"] is None or score > progress["best_score"]
        if improved:
            progress.update(best_epoch=epoch, best_score=score, stale_epochs=0)
            state.best_state = _weights(state.raw_model)
        else:
            progress["stale_epochs"] += 1
    progress.update(epoch=epoch, assembled=None)  # a model of the best branches is assembled after the last epoch
    progress["history"].append(metrics)
    patience = optim.early_stopping_patience
    return improved, patience is not None and progress["stale_epochs"] >= patience


def update_ema(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float, step: int) -> None:
    """Moves the average ``ema`` (a state dict) towards ``model``'s weights after optimizer step ``step``
    (from 1), in place. The decay is warmed up, min(decay, (1 + step) / (10 + step)), so that the first
    steps do not leave the average near the initial weights; integer buffers (BatchNorm's batch count)
    are copied."""
    weight = 1 - min(decay, (1 + step) / (10 + step))
    current = model.state_dict()
    floats = [key for key, value in current.items() if value.is_floating_point()]
    with torch.no_grad():
        # One fused call per step instead of one per tensor: this runs after every optimizer step.
        torch._foreach_lerp_([ema[k] for k in floats], [current[k] for k in floats], weight)
        for key, value in current.items():
            if not value.is_floating_point():
                ema[key].copy_(value)


@contextlib.contextmanager
def _holding(model: FusionClassifier, weights: dict[str, torch.Tensor]):
    """Inside, ``model`` holds ``weights``; its own are back afterwards."""
    own = _weights(model)
    model.load_state_dict(weights)
    try:
        yield
    finally:
        model.load_state_dict(own)


def evaluated_weights(state: WorkerState):
    """Inside, ``raw_model`` holds the weights a bundle would get: the moving average with optim.ema_decay,
    else the weights as trained; the trained ones are back afterwards, to train on."""
    return contextlib.nullcontext() if state.ema is None else _holding(state.raw_model, state.ema)


def _weights(model: FusionClassifier, prefixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state dict, or of its keys that start with one of ``prefixes``."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def assemble_best_branches(state: WorkerState, val_shard) -> None:
    """Branches trained separately: the model of each branch's best epoch, its image share and temperature
    fitted on validation (``validate``), recorded as the progress' "assembled" and checkpointed."""
    progress = state.progress
    with _holding(state.raw_model, state.best_state):  # the checkpoint keeps the last epoch's weights to train on
        progress["assembled"] = {
            "branch_epochs": {branch: best["epoch"] for branch, best in progress["best_branches"].items()},
            **validation_metrics(*validate(state, val_shard)),
        }
    chosen = progress["assembled"]
    progress["best_epoch"] = max(chosen["branch_epochs"].values())
    if state.rank == 0:
        say(f"best branches: image epoch {chosen['branch_epochs']['image']}, text epoch "
            f"{chosen['branch_epochs']['text']}; image share {chosen['image_share']}: val_acc "
            f"{chosen['val_accuracy']:.4f}  macro_f1 {chosen['val_macro_f1']:.4f}")
    _report_checkpoint(state, {"epoch": progress["epoch"], "val_accuracy": chosen["val_accuracy"]}, progress,
                       checkpoint_name(progress["epoch"], progress["steps"], True) + "_assembled")


def _report_checkpoint(state: WorkerState, metrics: dict, progress: dict, name: str) -> None:
    """``ray.train.report`` of ``metrics`` with the checkpoint ``name``. Every worker calls it: rank 0
    writes the checkpoint, which holds every worker's random generators."""
    import ray.train

    rng = _gather(_rng_state(state), state.world)
    if state.rank != 0:
        ray.train.report(metrics, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as directory:
        ema = {k: v.cpu() for k, v in state.ema.items()} if state.ema is not None else None
        CheckpointPayload(state.raw_model.state_dict(), state.optimizer.state_dict(), state.scaler.state_dict(),
                          state.best_state, progress, rng, ema).save(directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name)


def save_step_checkpoint(state: WorkerState, so_far: EpochSoFar) -> None:
    """A checkpoint inside an epoch: the run's state now, and ``so_far`` to go on with the epoch."""
    steps = state.progress["steps"]
    _report_checkpoint(state, {"epoch": so_far.epoch + 1, "steps": steps, "epoch_rows": so_far.rows},
                       {**state.progress, "in_epoch": asdict(so_far)}, checkpoint_name(so_far.epoch + 1, steps, False))


def report(state: WorkerState, metrics: dict, improved: bool, stop: bool, tensorboard: TensorBoardLog | None) -> None:
    """The epoch line on the console, TensorBoard and MLflow (rank 0), and the epoch's checkpoint."""
    if state.rank == 0:
        lr = state.optimizer.param_groups[0]["lr"]
        if tensorboard is not None:
            tensorboard.epoch(metrics, lr)
        if state.loop.mlflow is not None:
            log_epoch(state.loop.mlflow, {**{key: metrics[key] for key in TensorBoardLog.SCALARS.values()}, "lr": lr},
                      metrics["epoch"])
        say(
            f"epoch {metrics['epoch']}/{state.loop.optim.epochs}  train_loss {metrics['train_loss']:.4f}  "
            f"val_loss {metrics['val_loss']:.4f} (calibrated {metrics['val_nll_calibrated']:.4f})  "
            f"val_acc {metrics['val_accuracy']:.4f}  "
            f"macro_f1 {metrics['val_macro_f1']:.4f}  {metrics['train_samples_per_s']:.0f} samples/s  "
            f"{metrics['epoch_seconds']:.1f} s" + ("  *" if improved else "") + ("  (early stop)" if stop else "")
        )
    _report_checkpoint(state, metrics, state.progress, checkpoint_name(metrics["epoch"], state.progress["steps"], True))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point in each worker: ``config["loop"]`` is the run's ``LoopConfig``."""
    import ray.train

    state = build_worker(config["loop"])
    state.progress["precision"] = state.precision
    optim = state.loop.optim
    weight = torch.tensor(state.loop.class_weights, device=state.device) if state.loop.class_weights else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    tensorboard = TensorBoardLog(state.loop.tensorboard) if state.rank == 0 and state.loop.tensorboard else None
    patience = optim.early_stopping_patience
    already_stopped = patience is not None and state.progress["stale_epochs"] >= patience
    for epoch in range(state.progress["epoch"], 0 if already_stopped else optim.epochs):
        started = time.perf_counter()
        before = EpochSoFar.resumed(state.progress.pop("in_epoch", None), epoch)
        trained = train_epoch(state, train_shard, before, loss_fn)
        with evaluated_weights(state):
            validated = validation_metrics(*validate(state, val_shard))
            metrics = epoch_metrics(trained, validated, before.seconds + time.perf_counter() - started)
            improved, stop = record(state, metrics)
        report(state, metrics, improved, stop, tensorboard)
        if stop:
            break
    if state.separate and state.progress["assembled"] is None:
        assemble_best_branches(state, val_shard)


# --- on the driver ------------------------------------------------------------------------------


def check_resume(cfg: TrainConfig, run_dir: rfs.Location) -> None:
    """Records the run's settings in its folder; refuses, before any cluster work, a start that would
    resume checkpoints trained with other settings (another model, data or optimisation), which would
    otherwise fail inside every worker or go on silently with the old ones."""
    settings = dump_config(cfg)
    saved_at = run_dir.join(RUN_SETTINGS)
    if rfs.exists(run_dir.join(CHECKPOINT_SNAPSHOT)) and rfs.exists(saved_at):
        now, then = flat_config(settings), flat_config(json.loads(rfs.read_text(saved_at)))
        changed = sorted(key for key in now.keys() | then.keys()
                         if now.get(key) != then.get(key) and not key.startswith(RESUMABLE_CHANGES))
        if changed:
            listed = "; ".join(f"{key}={now.get(key, '(none)')} (the run's: {then.get(key, '(none)')})"
                               for key in changed[:5])
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            resumable = ", ".join(key + "*" if key.endswith(".") else key for key in RESUMABLE_CHANGES)
            raise TrainError(
                f"run {cfg.run.name!r} in {cfg.run.storage_path} has checkpoints, which this command would resume, "
                f"but they were trained with other settings: {listed}{more}. To train these settings, give the run "
                f"another name (run.name=...) or remove {run_dir.url}; to go on with that run, use its settings "
                f"({saved_at.url}). A resumed run may change only {resumable}"
            )
    rfs.write_text(saved_at, json.dumps(settings, indent=1))


def ingest_config(data: TrainingData):
    """How the workers read their shards each epoch: with the job's resource limits (given here, as
    Ray Train's default options pass a deprecated field and warn), and one progress bar per dataset
    and epoch, without a bar per operator (the epoch line reports the training itself)."""
    import ray.train
    from ray.data import DataContext, ExecutionOptions

    for ds in (data.train, data.val):
        ds.context.enable_operator_progress_bars = False
    current = DataContext.get_current().execution_options
    return ray.train.DataConfig(
        execution_options=ExecutionOptions(resource_limits=current.resource_limits, verbose_progress=False)
    )


def run_train(cfg: TrainConfig) -> dict:
    """Trains (or resumes) the run and writes the bundle of its best epoch; returns a summary."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    require_mlflow(cfg)
    storage = rfs.resolve_output(cfg.run.storage_path, cfg.storage)  # local paths made absolute
    run_dir = storage.join(cfg.run.name)
    check_resume(cfg, run_dir)  # a run that cannot write its checkpoints fails here, first
    data = load_training_data(cfg)  # checks inputs, then starts Ray
    capacity = cluster_capacity()
    resources = plan_worker_resources(cfg.scaling, capacity)
    if capacity.autoscales:
        wait_for_resources([resources] * cfg.scaling.num_workers,
                           f"{cfg.scaling.num_workers} training worker(s)", cfg.ray.node_wait_s)
    # ModelSection's fields are ModelConfig's; the data decides the rest.
    model_config = ModelConfig(
        num_classes=len(data.classes), vocab_size=len(data.vocab), image_size=data.image.size, **cfg.model.model_dump()
    )
    balanced = cfg.optim.class_weighting == "balanced"
    mlflow_run = open_run(cfg, run_dir) if cfg.run.mlflow_tracking_uri else None
    loop = LoopConfig(
        model=model_config,
        optim=cfg.optim,
        amp=cfg.scaling.amp,
        torch_threads=cfg.scaling.torch_threads,
        class_weights=class_weights(data.classes, data.class_counts) if balanced else None,
        train_rows=data.train_rows,
        progress_interval_s=cfg.run.progress_interval_s,
        tensorboard=run_dir.join(TENSORBOARD_DIR) if cfg.run.tensorboard else None,
        checkpoint_every_steps=cfg.run.checkpoint_every_steps,
        mlflow=mlflow_run,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        ),
        datasets={"train": data.train, "val": data.val},
        dataset_config=ingest_config(data),
    )
    log.info(
        "training %s on %d worker(s) x %s, %d classes, vocabulary %d",
        cfg.model.mode, cfg.scaling.num_workers, resources, len(data.classes), len(data.vocab),
    )
    try:
        return _fit_and_bundle(cfg, trainer, data, model_config, mlflow_run)
    except BaseException:
        if mlflow_run is not None:
            end_run(mlflow_run, "FAILED")
        raise


def _fit_and_bundle(cfg: TrainConfig, trainer, data: TrainingData, model_config: ModelConfig,
                    mlflow_run: MlflowRun | None) -> dict:
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise TrainError(f"run {cfg.run.name} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        best_state = torch.load(os.path.join(directory, CKPT_BEST), weights_only=True)
        progress = json.loads(Path(directory, CKPT_PROGRESS).read_text())
    # Separately trained branches: the two best epochs' model; otherwise the best epoch's.
    best = progress.get("assembled") or progress["history"][progress["best_epoch"] - 1]
    metrics = {
        "best_epoch": progress["best_epoch"],
        "best": best,
        "epochs_run": progress["epoch"],
        "attempts": progress["attempts"],
        "worker_nodes": progress["worker_nodes"],
        "history": progress["history"],
        "resumed_mid_epoch": progress.get("resumed_mid_epoch", []),
        "config": dump_config(cfg),
    }
    bundle_url = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}/{BUNDLE_DIR}"
    if best.get("image_share") is not None:
        model_config = replace(model_config, image_share=best["image_share"])
    bundle = Bundle(model_config, data.image, data.text, data.vocab, data.classes, best_state, metrics,
                    precision={"trained": progress.get("precision", "fp32"), "validated": progress.get("precision", "fp32")},
                    temperature=best["temperature"])
    identity = save_bundle(bundle_url, cfg.storage, bundle)
    if mlflow_run is not None:
        with tempfile.TemporaryDirectory(prefix="raypipe-bundle-") as directory:  # MLflow uploads local files
            save_bundle(directory, cfg.storage, bundle)
            log_bundle(mlflow_run, directory)
        end_run(mlflow_run, "FINISHED")
    summary = ("best_epoch", "best", "epochs_run", "attempts", "worker_nodes", "history", "resumed_mid_epoch")
    return {"bundle": bundle_url, "identity": identity, **{k: metrics[k] for k in summary}}
