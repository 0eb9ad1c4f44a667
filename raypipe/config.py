"""Job configuration: pydantic models loaded from YAML plus ``section.field=value`` overrides.

Every field has a description (docs/configuration.md is generated from them). Unknown keys and bad
values are rejected before Ray starts, with the field's dotted name and what is allowed.

Secrets: a URL holding credentials (``scheme://user:password@host``) is refused in every field, and
errors never echo a secret. Object-store credentials come from the environment, the AWS credential file
or the instance profile, or from the ``SecretStr`` fields of ``storage``, which print and dump as
``**********``.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from raypipe.errors import UserError
from raypipe.transforms.image import ImageOptions
from raypipe.transforms.split import SplitRule
from raypipe.transforms.text import TextOptions

DEFAULT_SAMPLE_DIR = "~/.cache/raypipe/sample-v1"


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message says which field and what to do."""


# The userinfo of a URL (scheme://user:password@host): up to the last "@" before the path, or, since a
# password may hold "/" (AWS secret keys do), up to an "@" after "user:" unless that ":" starts a port
# ("host:9000/a@b").
_URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)(?:[^/?#\s]*@|[^/?#:@\s]*:(?!\d*(?:[/?#\s]|$))[^@\s]*@)")

CREDENTIALS_BELONG = (
    "credentials belong in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN), "
    "the credential file (~/.aws/credentials, AWS_PROFILE) or storage.access_key_id / "
    "storage.secret_access_key / storage.session_token, which are never printed or written"
)


def mask_url_credentials(text: str) -> str:
    """``text`` with the user name and password of every URL in it replaced by ``***``."""
    return _URL_USERINFO.sub(r"\1***@", text)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @field_validator("*")
    @classmethod
    def _no_credentials_in_urls(cls, value: Any) -> Any:
        # Every text field, not only the URL ones: a config is printed and saved with the outputs.
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and _URL_USERINFO.search(text) for text in texts):
            raise ValueError(f"a URL must not hold a user name or password: {CREDENTIALS_BELONG}")
        return value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


SECRET_FIELD_NOTE = (
    "Never printed or written (configs show it masked); give it in a --config file only you can read, not on "
    "the command line, which other users of the machine can see."
)


class StorageConfig(Section):
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO/moto. "
        "Default: the AWS_ENDPOINT_URL environment variable, else AWS itself.",
    )
    region: str | None = Field(None, description="S3 region. Default: AWS_DEFAULT_REGION / AWS_REGION, else us-east-1.")
    anonymous: bool = Field(False, description="Read public buckets without credentials (no request signing).")
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to wait for a connection to the object store.")
    request_timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for one object-store request.")
    retries: int = Field(5, ge=0, le=20, description="Retries of a failed object-store request (with backoff).")
    shared_filesystem: bool = Field(
        False,
        description="Local paths are on a filesystem mounted at the same path on every node (NFS, EFS, Lustre). "
        "Without it a job on a cluster of more than one node refuses local input and output paths, which each "
        "node would resolve on its own disk.",
    )
    access_key_id: SecretStr | None = Field(
        None,
        description="S3 access key id, set together with secret_access_key. Prefer the environment "
        f"(AWS_ACCESS_KEY_ID) or the credential file (~/.aws/credentials). {SECRET_FIELD_NOTE}",
    )
    secret_access_key: SecretStr | None = Field(
        None,
        description="S3 secret access key, set together with access_key_id. Prefer the environment "
        f"(AWS_SECRET_ACCESS_KEY) or the credential file (~/.aws/credentials). {SECRET_FIELD_NOTE}",
    )
    session_token: SecretStr | None = Field(
        None,
        description="Session token of temporary S3 credentials (with the two keys). Prefer the environment "
        f"(AWS_SESSION_TOKEN) or the credential file (~/.aws/credentials). {SECRET_FIELD_NOTE}",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _is_http_endpoint(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must look like http(s)://host[:port]")
        return url

    @model_validator(mode="after")
    def _whole_credentials(self) -> StorageConfig:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key are set together")
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("session_token needs access_key_id and secret_access_key")
        if self.anonymous and self.access_key_id is not None:
            raise ValueError("anonymous=true sends no credentials; unset access_key_id and secret_access_key")
        return self


def _holds_secret(annotation: Any) -> bool:
    return SecretStr in (annotation, *get_args(annotation))


SECRET_FIELDS = frozenset(name for name, field in StorageConfig.model_fields.items() if _holds_secret(field.annotation))


class DataConfig(Section):
    input: list[str] = Field(
        default_factory=lambda: [f"{DEFAULT_SAMPLE_DIR}/webdataset"],
        description="Shards to read: local paths, s3://, gs:// (with the gcs extra: pip install 'raypipe[gcs]') or any "
        "fsspec URL; each a file, a directory "
        "(read recursively) or a glob. Default: the built-in sample (generated on first use).",
    )
    format: Literal["auto", "webdataset", "img2dataset_parquet", "parquet"] = Field(
        "auto",
        description="webdataset: img2dataset .tar shards (failed downloads are read from the .parquet beside "
        "each tar); img2dataset_parquet: img2dataset parquet shards; parquet: any table of pairs (set the "
        "column names below); auto: by file extension (.tar -> webdataset, .parquet -> img2dataset_parquet).",
    )
    key_column: str = Field("key", description="Column with a unique, stable row id (parquet inputs).")
    image_column: str = Field("jpg", description="Column with encoded image bytes (parquet inputs).")
    text_column: str = Field("caption", description="Column with the text paired with the image (parquet inputs).")
    keep_columns: list[str] = Field(
        default_factory=list, description="Extra input columns copied unchanged to the output (e.g. id, url)."
    )
    limit: int | None = Field(None, gt=0, description="Read at most this many rows (for quick trials).")

    _split_input = field_validator("input", "keep_columns", mode="before")(_as_list)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, urls: list[str]) -> list[str]:
        if not urls or any(not u.strip() for u in urls):
            raise ValueError("needs at least one non-empty path or URL")
        return urls


class LabelConfig(Section):
    source: Literal["column", "coyo_labeled", "none"] = Field(
        "column",
        description="column: class names (or ints) in `column`; coyo_labeled: COYO-Labeled-300M `labels` "
        "(ImageNet-21k ids) + `label_probs`, top-1 among `classes` above `min_prob`; none: unlabeled data.",
    )
    column: str = Field("label", description="Label column (source=column).")
    sidecar: str | None = Field(
        None,
        description="Parquet file(s) (URL, directory or glob) holding the labels, joined on `join_on`. "
        "Use for COYO-Labeled-300M label files or any labels kept apart from the shards.",
    )
    join_on: str = Field("key", description="Column present in both the shards and the sidecar, e.g. key or id.")
    classes: list[str] | None = Field(
        None,
        description="The class list, in order (ids are positions); names or integers (matched against the labels "
        "as text). Default for source=column: every distinct label in the data, sorted (integer labels by value). "
        "Required for coyo_labeled (ImageNet-21k ids).",
    )
    min_prob: float = Field(0.5, ge=0.0, le=1.0, description="coyo_labeled: minimum probability of the top-1 class.")

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_as_text(cls, classes: Any) -> Any:
        # Labels are compared as text (label_text: 7 and 7.0 are "7"); YAML reads [1, 2] as integers.
        if isinstance(classes, list):
            return [str(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in classes]
        return classes

    @model_validator(mode="after")
    def _coyo_needs_classes(self) -> LabelConfig:
        if self.source == "coyo_labeled" and not self.classes:
            raise ValueError("labels.classes is required when labels.source=coyo_labeled (ImageNet-21k ids)")
        return self


class VocabConfig(Section):
    min_freq: int = Field(2, ge=1, description="Keep tokens seen at least this often in the training split.")
    max_size: int = Field(20_000, ge=3, description="At most this many ids, including padding (0) and unknown (1).")


class SplitConfig(Section):
    """Train / validation / test by a hash of each row's key (raypipe/transforms/split.py): stable across runs."""

    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Share of rows in validation: early stopping, the epoch kept, the temperature and every recipe "
        "choice are made on it (the paper: 0.2, with test_fraction=0).",
    )
    test_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Share of rows held out for test: no training decision reads them; evaluate and ablation "
        "report on them. 0 gives the paper's two-way split.",
    )
    salt: str = Field("raypipe", description="Mixed into the key hash; change it to draw a different split.")

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"split.val_fraction + split.test_fraction must be below 1 (got {self.val_fraction} + "
                f"{self.test_fraction}): nothing would be left to train on"
            )
        return self

    def rule(self) -> SplitRule:
        return SplitRule(self.val_fraction, self.test_fraction, self.salt)


class RayConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster to join ('auto', ray://host:10001). Default: RAY_ADDRESS, else a local cluster."
    )
    node_wait_s: float = Field(
        900.0,
        gt=0,
        description="Seconds a job on an autoscaling cluster waits for the nodes its first workers or actors need "
        "(a cloud node boots and installs in 5-10 min) before it fails naming what it asked for.",
    )
    num_cpus: int | None = Field(None, ge=1, description="Logical CPUs of a local cluster. Default: all cores.")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Rows per preprocessing batch (map_batches). Default: one batch per read block (a Parquet file "
        "or tar, up to block_mib), which lets Ray Data run the read and the preprocessing in one task instead of "
        "passing the image bytes between two through the object store. A number caps the batch; the read then "
        "runs as tasks of its own.",
    )
    progress_bars: bool = Field(True, description="Show Ray Data progress bars.")
    block_mib: int = Field(
        128,
        ge=1,
        le=1024,
        description="Target size of a Ray Data block, MiB (Ray's default 128). Smaller blocks let the stages of a "
        "small input overlap (labeling 10 shards of 384 px JPEGs: 16 MiB gave 436 pairs/s, 128 gave 365 on "
        "2 cores) but stalled the read of a 100-shard input on 2 CPUs (269 vs 658 pairs/s at 128).",
    )
    parquet_reader_v2: bool | None = Field(
        None,
        description="Read Parquet with Ray Data's newer reader (DataSourceV2, Ray's default) instead of one read task "
        "per file. Default: off on a cluster that can have at most 8 CPUs, on above (Ray's default). Off: on 2 CPUs the newer one packed 40 shards into 4 read tasks and started footer-reading actors "
        "on every run (prepare, 20k pairs: 1,448 vs 1,835 images/s; docs/benchmarks.md).",
    )
    reserve_per_operator: bool | None = Field(
        None,
        description="Ray Data's per-operator resource reservation (DataContext.op_resource_reservation_enabled, Ray's "
        "default on). Default: off on a cluster that can have at most 8 CPUs, on above (Ray's default). Off: on 2 CPUs it kept a core idle between the read and the preprocessing operators (prepare, "
        "4k pairs, per-file reader: 1,260 vs 2,034 images/s). An object_store_mib budget is enforced either way.",
    )
    object_store_mib: int | None = Field(
        None,
        ge=64,
        description="Ray Data's object-store budget for this job's blocks in flight between stages, whole cluster, MiB: "
        "backpressure holds the readers and preprocessing back once their output waiting for the next stage "
        "reaches it. Default (null): no budget without reserve_per_operator, else Ray's, half the object store "
        "(30% of RAM), so a fast reader ahead of a slow model buffers up to that much.",
    )


class LabelRayConfig(RayConfig):
    object_store_mib: int | None = Field(
        256,
        ge=64,
        description="Ray Data's object-store budget for blocks in flight between stages, whole cluster, MiB. "
        "Preprocessing is ~4x faster than a CPU model, so without a budget it runs ahead and the whole input ends "
        "up buffered in the object store (100k rows of 384 px JPEGs: 1.1 GiB of it; with 256: 0.3 GiB, same "
        "throughput). null: no budget.",
    )


class ReadSections(Section):
    """What to read and where it lives: shared by every job that reads raw pairs."""

    data: DataConfig = Field(default_factory=DataConfig, description="What to read.")
    labels: LabelConfig = Field(default_factory=LabelConfig, description="Where class labels come from.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Deterministic train/validation split.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object-store settings.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster and execution settings.")


class DataSections(ReadSections):
    """Reading plus how to preprocess: the jobs that decide the preprocessing (prepare, train)."""

    image: ImageOptions = Field(default_factory=ImageOptions, description="Image preprocessing.")
    text: TextOptions = Field(default_factory=TextOptions, description="Text preprocessing.")
    vocab: VocabConfig = Field(default_factory=VocabConfig, description="Vocabulary built from the training split.")


class PrepareConfig(DataSections):
    """jobs/prepare.py: read shards -> preprocess -> prepared Parquet + vocab/classes/stats."""

    output: str = Field(
        "~/.cache/raypipe/prepared", description="Where prepared shards, vocab.json, classes.json, stats.json go."
    )
    overwrite: bool = Field(False, description="Replace an existing output instead of refusing to touch it.")


def _urls_given(urls: list[str]) -> list[str]:
    if not urls or any(not u.strip() for u in urls):
        raise ValueError("needs at least one non-empty path or URL")
    return urls


# Columns the ingest job writes itself (img2dataset's Parquet columns + the label); keep_columns must
# not reuse them.
INGEST_OUTPUT_COLUMNS = (
    "label", "caption", "url", "key", "status", "error_message", "width", "height", "original_width",
    "original_height", "exif", "sha256", "jpg",
)


class EncodeOptions(Section):
    """How ingest re-encodes each image: part of the ingest config, and what ``encode_image`` reads."""

    jpeg_quality: int = Field(
        95, ge=1, le=100, description="JPEG quality of the re-encoded images (img2dataset's encode_quality)."
    )
    max_side: int | None = Field(
        384,
        ge=8,
        description="Downscale so the longer side is at most this, keeping the aspect ratio; never upscale "
        "(img2dataset's resize_mode=keep_ratio_largest with resize_only_if_bigger). null: keep the original size.",
    )
    max_pixels: int = Field(
        40_000_000,
        gt=0,
        description="Refuse images (and SVG drawings) declaring more pixels than this (decompression-bomb guard).",
    )


class IngestConfig(EncodeOptions):
    """jobs/ingest.py: a manifest of the user's own labeled pairs (image path or URL, text, label) ->
    shards in img2dataset's Parquet format, ready for jobs/prepare.py."""

    manifest: list[str] = Field(
        description="Manifest file(s): local paths, s3:// or any fsspec URL; each a file, a directory (read "
        "recursively, by extension) or a glob. One row per pair.",
    )
    format: Literal["auto", "csv", "jsonl", "parquet"] = Field(
        "auto",
        description="auto: by extension (.csv -> csv, .tsv -> tab-separated csv, .jsonl/.ndjson/.json -> "
        "one JSON object per line, or one array of objects, .parquet -> parquet).",
    )
    image_column: str = Field(
        "image",
        description="Column with the image: a local path (absolute, or relative to base_dir, else to the "
        "manifest's folder), an http(s):// or s3:// (any fsspec) URL, or the encoded bytes (binary column).",
    )
    text_column: str = Field("text", description="Column with the text paired with the image (written as caption).")
    label_column: str | None = Field(
        "label",
        description="Column with the class label, written as the shards' `label` column (then prepare with "
        "labels.column=label). null: unlabeled pairs.",
    )
    key_column: str | None = Field(
        None,
        description="Column with a unique id per row, written as `key`. Default: img2dataset's own key from "
        "the row's position (shard id and index, e.g. 000010042); it changes when rows are reordered or added, "
        "and so does the key-hash train/validation split. Set a key column for keys that stay.",
    )
    keep_columns: list[str] = Field(
        default_factory=list, description="Extra manifest columns saved into the shards (img2dataset's save_additional_columns)."
    )
    base_dir: str | None = Field(
        None, description="Folder (path or URL) that relative image paths start from. Default: each manifest's folder."
    )
    output: str = Field(
        description="Where the shards go (any URL): {shard:05d}.parquet and {shard:05d}_stats.json, as img2dataset writes them."
    )
    overwrite: bool = Field(False, description="Replace shards already in `output` instead of refusing to touch them.")
    shard_size: int = Field(10_000, ge=1, description="Rows per shard (img2dataset's number_sample_per_shard).")
    timeout_s: float = Field(10.0, gt=0, description="Seconds to wait for one http(s) image download (img2dataset's timeout).")
    fetch_threads: int = Field(16, ge=1, le=256, description="Concurrent image reads per shard (img2dataset's thread_count).")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object-store settings.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster and execution settings.")

    _split_lists = field_validator("manifest", "keep_columns", mode="before")(_as_list)
    _manifest_not_empty = field_validator("manifest")(_urls_given)

    @model_validator(mode="after")
    def _distinct_columns(self) -> IngestConfig:
        clashes = sorted(set(self.keep_columns) & set(INGEST_OUTPUT_COLUMNS))
        if clashes:
            raise ValueError(f"keep_columns {clashes} clash with the columns ingest writes: {list(INGEST_OUTPUT_COLUMNS)}")
        return self


class ModelSection(Section):
    mode: Literal["fusion", "image", "text"] = Field(
        "fusion", description="fusion: CNN + LSTM-attention (the paper); image / text: one branch (the ablation)."
    )
    conv_channels: list[int] = Field(
        [32, 64, 128], min_length=1, description="Output channels of each conv3x3 + maxpool block of the CNN."
    )
    batch_norm: bool = Field(False, description="BatchNorm after each convolution (a departure; the paper has none).")
    image_pool: Literal["flatten", "avg"] = Field(
        "flatten",
        description="How the CNN's last feature map becomes the image features: flatten (the paper; channels x "
        "positions, 8,192 by default) or avg (global average pooling: one per channel, 128 by default).",
    )
    embed_dim: int = Field(128, ge=1, description="Word embedding size.")
    lstm_hidden: int = Field(128, ge=1, description="LSTM hidden size (per direction).")
    lstm_layers: int = Field(1, ge=1, le=4, description="Stacked LSTM layers.")
    bidirectional: bool = Field(False, description="Bidirectional LSTM.")
    embed_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the word embeddings, the LSTM's input (a departure; the paper: 0)."
    )
    text_bag_of_words: bool = Field(
        False,
        description="The text features also hold the mean of the text's word embeddings beside the LSTM-attention "
        "output, a bag-of-words path for texts that are lists of keywords (a departure; the paper: off).",
    )
    text_linear: bool = Field(
        True,
        description="A linear classifier on which words the text holds (logistic regression on the L2-normalised "
        "word-presence vector) learns beside the text head and adds its logits to the text's (wide and deep; a "
        "departure; the paper: false).",
    )
    fc_dims: list[int] = Field(
        [256],
        description="Hidden sizes of the fully connected layers of every classifier head: the image-only and "
        "text-only models', the mlp fusion head's, and each branch's with fusion_head=sum or aux_heads.",
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="Dropout before each fully connected layer.")
    modality_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="fusion trained jointly (fusion_head=mlp, or optim.branch_training=joint), training only: this "
        "share of the samples loses the image or the text features (zeroed, a coin flip which), so neither branch "
        "leans on the other (a departure from the paper; 0: off).",
    )
    aux_heads: bool = Field(
        False,
        description="fusion trained jointly: also a classifier on each branch's features, trained with its own loss "
        "(weight optim.aux_loss_weight) beside the fused one, so each branch keeps learning after the other has "
        "fitted the training set (a departure from the paper; off).",
    )
    fusion_head: Literal["mlp", "sum"] = Field(
        "sum",
        description="fusion: sum (raypipe's recipe, late fusion: a classifier per branch, the prediction is the sum "
        "of their logits weighted by an image share fitted on validation; see optim.branch_training) or mlp (the "
        "paper: fully connected layers, fc_dims, on the concatenated features).",
    )


class OptimSection(Section):
    lr: float = Field(0.001, gt=0, description="Adam learning rate (the paper: 0.001).")
    batch_size: int = Field(32, ge=1, description="Global batch size, split across workers (the paper: 32).")
    epochs: int = Field(
        100, ge=1, description="Maximum epochs (the paper: 100); early stopping (early_stopping_patience) usually "
        "ends a run well before."
    )
    weight_decay: float = Field(
        0.0005, ge=0, description="Adam weight decay (L2 on every weight; raypipe's recipe: 0.0005, chosen on "
        "validation, docs/results.md; the paper has none: 0)."
    )
    early_stopping_patience: int | None = Field(
        10, ge=1, description="Stop after this many epochs without a better validation epoch (by best_epoch_by; "
        "null: never; the weights of the best validation epoch are kept either way)."
    )
    best_epoch_by: Literal["val_nll", "val_accuracy"] = Field(
        "val_nll",
        description="What makes a validation epoch the best, whose weights are kept and from which "
        "early_stopping_patience counts (for separately trained branches, each branch's own): val_nll (the "
        "validation negative log-likelihood at the temperature fitted for that epoch; a smoother guide than "
        "accuracy on a few hundred validation rows: raypipe's recipe, chosen on validation, docs/results.md) or "
        "val_accuracy (the first epoch of highest validation accuracy; the paper's).",
    )
    class_weighting: Literal["none", "balanced"] = Field(
        "none", description="balanced: weight the loss by inverse class frequency of the training split."
    )
    shuffle_buffer: int = Field(2000, ge=0, description="Rows in each worker's local shuffle buffer (0: no shuffle).")
    seed: int = Field(0, description="Seed of model initialisation and shuffling.")
    aux_loss_weight: float = Field(
        0.5, ge=0, description="branch_training=joint: weight of each branch's own loss when model.aux_heads is on."
    )
    branch_training: Literal["separate", "joint"] = Field(
        "separate",
        description="fusion with model.fusion_head=sum: separate (raypipe's recipe: each branch learns from its own "
        "classifier's loss only, as the one-branch model would, and keeps the weights of its own best validation "
        "epoch; the run stops when neither has improved for early_stopping_patience epochs; a branch that fits the "
        "training set fast cannot starve the other) or joint (the loss of the summed logits, plus aux_loss_weight x "
        "each branch's with model.aux_heads; the best epoch of the sum is kept). Either way the image share of the "
        "sum and the temperature are fitted on validation. fusion_head=mlp always trains jointly.",
    )
    augment: bool = Field(
        True,
        description="Random horizontal flips and shifts of up to 1/16 of the image side (edges repeated) of the "
        "training images, drawn anew every epoch (raypipe's recipe; the paper has none: false).",
    )
    ema_decay: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Keep an exponential moving average of the weights, updated after every step with this decay "
        "(warmed up as min(decay, (1 + step) / (10 + step))), and validate, keep and bundle it instead of the "
        "weights as trained (0.99 averages over about the last 100 steps). null: off (the paper's).",
    )


class ScalingSection(Section):
    num_workers: int = Field(1, ge=1, description="Data-parallel training workers (DDP).")
    use_gpu: bool = Field(False, description="One GPU per worker; NCCL and mixed precision.")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per worker. Default: 1, reduced so at least one CPU stays free for Ray Data "
        "(a trainer that takes every CPU starves its own input pipeline).",
    )
    amp: bool = Field(True, description="Mixed precision (bfloat16/float16 autocast) when training on GPU.")
    cache_mib: int = Field(
        2048,
        ge=0,
        description="With `prepared`: keep the training and validation rows in Ray's object store after one read "
        "when they take at most this many MiB decoded, so later epochs do not read and filter the Parquet again "
        "(Ray Train's advice for data that fits). 0: read from storage every epoch.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="PyTorch intra-op threads per worker when training on CPU. Default: the node's cores divided "
        "by the workers on it (Ray alone would give a 1-CPU worker one thread and leave the other cores idle).",
    )


# A config value that becomes one folder name: it cannot name a path outside the folder it is put in.
FOLDER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def _folder_name(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(FOLDER_NAME_PATTERN, value):
        raise ValueError(
            "must be a single folder name: letters, digits, '.', '_' and '-', starting with a letter or digit, "
            "at most 128 characters (no '/', '\\', '..' or absolute path: it becomes part of the output path)"
        )
    return value


class RunSection(Section):
    name: str = Field(
        "raypipe-train",
        pattern=FOLDER_NAME_PATTERN,
        description="Run name. Re-running with the same name and storage_path resumes from the last checkpoint; "
        "a resumed run may change only optim.epochs, optim.early_stopping_patience and the scaling, run, ray and "
        "storage sections (other changes are refused before Ray starts: give the run another name).",
    )
    storage_path: str = Field(
        "~/raypipe-runs", description="Where checkpoints and the model bundle go (local path or s3://...)."
    )
    num_to_keep: int = Field(
        2,
        ge=1,
        description="Checkpoints kept per run (the newest). Each holds the best weights so far, which the bundle "
        "is made of, so older ones are never needed.",
    )
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from (restarts from the last checkpoint).")
    progress_interval_s: float = Field(
        30.0,
        gt=0,
        description="Seconds between progress lines inside an epoch: rows done, loss, samples/s, and the time left "
        "in the epoch and in the run.",
    )
    tensorboard: bool = Field(
        True,
        description="Write TensorBoard event files (train/validation loss, validation loss at the fitted "
        "temperature, validation accuracy and macro-F1, "
        "learning rate, samples/s; one point per epoch) to <storage_path>/<name>/tensorboard; watch them with "
        "`tensorboard --logdir <storage_path>/<name>/tensorboard`.",
    )
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        description="Also checkpoint every this many optimizer steps (counted over the whole run), not only at "
        "the end of each epoch. A run restarted from such a checkpoint (the same command again, or Ray Train "
        "after a worker failure) goes on with the interrupted epoch: every worker reads its shard again and "
        "trains only the rows after the ones the checkpoint counts, so the epoch trains as many rows as an "
        "uninterrupted one. They are the same rows when Ray Data streams the shard in the same order, which "
        "it does not promise; otherwise some rows of that epoch are trained twice and as many not at all. "
        "Step checkpoints count towards num_to_keep. Default: epoch ends only.",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="Also log the run to MLflow at this tracking URI (http(s)://host:port, or sqlite:///path/mlflow.db "
        "on one machine): the config as params, per-epoch metrics (the TensorBoard ones), the bundle as "
        "artifacts; the MLflow run is named after `name`, in the experiment MLFLOW_EXPERIMENT_NAME (else "
        "MLflow's default), and a resumed run logs to the same MLflow run. Needs `pip install "
        "'raypipe[mlflow]'`. Default: no MLflow.",
    )

    _name_is_a_folder = field_validator("name", mode="before")(_folder_name)

    @field_validator("mlflow_tracking_uri", mode="before")
    @classmethod
    def _no_mlflow_credentials(cls, value: Any) -> Any:
        # Before the check every field gets, to say where MLflow takes them from instead.
        if isinstance(value, str) and _URL_USERINFO.search(value):
            raise ValueError("the tracking URI must not hold a user name or password: MLflow reads them from "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
        return value


class TrainConfig(DataSections):
    """jobs/train.py: train the fusion model with Ray Train; writes checkpoints and a model bundle."""

    prepared: str | None = Field(
        None,
        description="Output of jobs/prepare.py to train on (decoded once). Default: preprocess the `data` input "
        "while training (streamed through the prepare stage every epoch).",
    )
    model: ModelSection = Field(default_factory=ModelSection, description="Model architecture.")
    optim: OptimSection = Field(default_factory=OptimSection, description="Optimisation.")
    scaling: ScalingSection = Field(default_factory=ScalingSection, description="Training workers and devices.")
    run: RunSection = Field(default_factory=RunSection, description="Run name, checkpoints, fault tolerance.")


class AblationConfig(TrainConfig):
    """jobs/ablation.py: the same training once per mode, on the same prepared split."""

    modes: list[Literal["image", "text", "fusion"]] = Field(
        ["image", "text", "fusion"], min_length=1, description="Model modes to train and compare."
    )
    seeds: list[int] | None = Field(
        None,
        min_length=1,
        description="Seeds (optim.seed: initialisation and shuffling) to train each mode with, all on the same "
        "split; runs are named <run.name>-<mode>-s<seed> and the table gives mean and standard deviation per "
        "mode. Default: one run per mode with optim.seed, named <run.name>-<mode>.",
    )
    evaluate_split: Literal["test", "val", "none"] = Field(
        "test",
        description="Split every finished run is evaluated on (jobs/evaluate.py's pipeline): accuracy, macro-F1 and "
        "calibration error per run and mode, the fusion confusion matrix and reliability diagram summed over its "
        "seeds. test: the held-out report; val: data prepared without a test split (split.test_fraction=0, the "
        "paper's); none: training figures only.",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds


class PredictSection(Section):
    batch_size: int = Field(256, ge=1, description="Rows per model call.")
    max_actors: int | None = Field(
        None,
        ge=1,
        description="Most predictor actors (each loads the model once). Default: one per GPU; on CPUs, CPUs - 1 "
        "(at least 2, sharing the CPUs the preprocessing leaves).",
    )
    use_gpu: bool = Field(False, description="One GPU per predictor actor.")
    top_k: int = Field(3, ge=1, description="How many best classes (with scores) each row gets.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Arithmetic of the model's forward pass (the weights stay fp32; rows whose two best scores are "
        "within 0.05 are run again in fp32). Default: on a GPU bf16 (fp16 where it has no bf16); on a CPU bf16 "
        "where it has native bf16 (AVX512-BF16 or AMX), else fp32. See docs/labeling.md (Precision).",
    )


class EvaluateConfig(ReadSections):
    """jobs/evaluate.py: a bundle on a prepared split, or on raw labeled shards preprocessed with the
    bundle's own settings (so `data` is read only when `prepared` is unset)."""

    bundle: str = Field("~/raypipe-runs/raypipe-train/bundle", description="The model bundle to evaluate.")
    prepared: str | None = Field(
        None, description="A prepare output to evaluate on. Default: preprocess `data` with the bundle's settings."
    )
    which_split: Literal["test", "val", "train", "all"] = Field(
        "test",
        description="Rows to evaluate: test (held out from every training decision), val, train or all (the split "
        "settings must match training's).",
    )
    predict: PredictSection = Field(default_factory=PredictSection, description="Inference settings.")
    output: str | None = Field(None, description="Where metrics.json, per_class.csv and PNGs go. Default: <bundle>/evaluation.")


C = TypeVar("C", bound=BaseModel)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What YAML found wrong and where, without the text around it (which may hold a secret)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return type(err).__name__
    # PyYAML quotes the offending token (an alias name, a character) in the problem text.
    problem = re.sub(r"'[^']*'", "'...'", problem)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def shown_name(item: str) -> str:
    """The part of a command-line item that can be a name, for an error: what follows may be a value, and a
    value may be secret."""
    name = re.match(r"[^=:@\s]*", item).group()
    return name if name == item else f"{name}..."


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); the value is read as YAML (3, true, [x, y], s3://...), but a
    secret field's as the text it is."""
    name, sep, raw = item.partition("=")
    if not sep or not name.strip():
        raise ConfigError(
            f"override {shown_name(item)!r} must look like section.field=value, e.g. data.input=s3://bucket/shards"
        )
    path = name.strip().split(".")
    if not raw.strip():
        return path, None
    if path[-1] in SECRET_FIELDS:
        return path, raw.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {name.strip()}: the value is not valid YAML ({_yaml_problem(e)})") from None
    # YAML reads "s3://b/x" fine but "a:b" style scalars can become dicts; keep such values as text.
    return path, raw if isinstance(value, dict) else value


def _set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def _section_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section (model) that holds the field at ``loc``; None when ``loc`` is inside a plain value."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at the section that holds ``loc`` (for 'did you mean')."""
    section = _section_at(model, loc)
    return list(section.model_fields) if section else []


def _shown_input(model: type[BaseModel], loc: tuple, value: Any) -> str:
    """The rejected value, for an error: plain values only (a section's may hold a secret field), never a
    secret field's."""
    section = _section_at(model, loc) if loc else None
    field = section.model_fields.get(str(loc[-1])) if section else None
    plain = all(isinstance(v, str | int | float | bool | None) for v in (value if isinstance(value, list) else [value]))
    return f" (got {value!r})" if plain and not (field and _holds_secret(field.annotation)) else ""


def _describe(model: type[BaseModel], err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        dotted = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(model, e["loc"])
            hint = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            lines.append(
                f"  {dotted}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; allowed here: {', '.join(allowed)}"
            )
        else:
            lines.append(f"  {dotted}: {e['msg']}{_shown_input(model, e['loc'], e.get('input'))}")
    return mask_url_credentials("\n".join(lines))


def load_config(model: type[C], yaml_path: str | Path | None = None, overrides: list[str] = ()) -> C:
    """YAML file (optional) + overrides -> validated config, or ConfigError naming every bad field."""
    tree: dict = {}
    origin = "defaults"
    if yaml_path is not None:
        path = Path(yaml_path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot read config file {path}: not valid YAML ({_yaml_problem(e)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        tree, origin = loaded, str(path)
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    if overrides:
        origin += " + command-line overrides"
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(model, e, origin)) from None


def dump_config(config: BaseModel) -> dict:
    """The resolved config as plain data, for provenance files: secret fields show as ``**********``
    (pydantic's JSON form of SecretStr), URLs cannot hold credentials."""
    return config.model_dump(mode="json")


def flat_config(tree: dict, prefix: str = "") -> dict[str, str]:
    """A dumped config (``dump_config``) flat: ``section.field`` -> its value as text (lists as JSON), the
    form of the command-line overrides."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


class LabelPredictSection(PredictSection):
    use_gpu: bool | None = Field(
        None, description="One GPU per predictor actor. Default: yes when the cluster has GPUs, else CPU actors."
    )
    cpus_per_actor: float = Field(
        0.9,
        gt=0,
        le=64,
        description="CPUs reserved per CPU predictor actor. Not exactly the 1 CPU of a preprocessing task, so Ray "
        "keeps preprocessing in its own parallel task stage instead of fusing it into the actors.",
    )


# Columns the labeling output writes itself; passthrough columns must not reuse these names.
LABEL_OUTPUT_COLUMNS = (
    "key", "label", "label_id", "confidence", "top_k_labels", "top_k_scores", "status", "error_message",
    "model", "source", "attention_words", "attention_weights",
)


class LabelJobConfig(ReadSections):
    """jobs/label.py: label Parquet collections of image-text pairs (or img2dataset shards) with a model
    bundle, preprocessing each pair with the bundle's own settings. One output directory per input file,
    so a re-run after a crash finishes only what is missing (see docs/labeling.md)."""

    labels: LabelConfig = Field(
        default_factory=lambda: LabelConfig(source="none"),
        description="Not used for labeling (inputs need no labels); kept so shared sections validate alike.",
    )
    bundle: str = Field("~/raypipe-runs/raypipe-train/bundle", description="The model bundle to label with (any URL).")
    output: str = Field(
        "~/.cache/raypipe/labels",
        description="Where labels go (any URL): <output>/<input file stem>/part-*.parquet per input file, "
        "plus _summary.json.",
    )
    overwrite: bool = Field(
        False,
        description="Relabel every input, also those whose output is already complete (and allow replacing "
        "labels written by another bundle). Default: complete outputs are kept and skipped.",
    )
    explain: bool = Field(
        False, description="Add attention_words / attention_weights: the words the text attention weighted most."
    )
    explain_words: int = Field(5, ge=1, le=64, description="How many words explain=true reports per row.")
    predict: LabelPredictSection = Field(default_factory=LabelPredictSection, description="Inference settings.")
    ray: LabelRayConfig = Field(default_factory=LabelRayConfig, description="Ray cluster and execution settings.")
    progress_interval_s: float = Field(10.0, gt=0, description="Seconds between progress lines while labeling.")
    rows_per_part: int | None = Field(
        None,
        ge=1,
        description="At most this many rows per output part file. Default: one part per Ray Data output block "
        "(many thousand labeled rows).",
    )

    @field_validator("data")
    @classmethod
    def _usable_data(cls, data: DataConfig) -> DataConfig:
        if data.limit is not None:
            raise ValueError("data.limit is not supported by label (outputs are complete per input file)")
        clashes = sorted(set(data.keep_columns) & set(LABEL_OUTPUT_COLUMNS))
        if clashes:
            raise ValueError(f"data.keep_columns {clashes} clash with output columns {list(LABEL_OUTPUT_COLUMNS)}")
        return data
