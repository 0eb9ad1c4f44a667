"""Linear baselines on a prepared split, for reference beside the neural ablation (scikit-learn,
``pip install -e '.[results]'``).

    python -m raypipe.tools.baselines ~/.cache/raypipe/prepared [--output DIR] [--pca 100]

On the rows of a ``jobs/prepare.py`` output with status ok, using its ``split`` column (the same
train / validation / test split the neural models use) and the same inputs they see:

* text: TF-IDF over the prepared token ids (cleaned, lemmatized, vocabulary of the training split,
  ``max_len`` tokens; padding dropped) + logistic regression;
* image: the prepared ``S x S x 3`` pixels, flattened and scaled to [0, 1], PCA (fitted on the
  training split, whitened) + logistic regression;
* late fusion: the average of the two models' class probabilities.

The logistic regressions' C is chosen by stratified cross-validation on the training split only;
the validation and test splits are used once each, to score (test only when the split has one). Reads the prepared Parquet with pyarrow on one machine
(no Ray): meant for sets that fit in memory, such as the Tux Paint stamps or the built-in sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypipe import schema
from raypipe.config import StorageConfig
from raypipe.io import fs as rfs
from raypipe.metrics import confusion_matrix, summary
from raypipe.transforms.image import image_rows
from raypipe.transforms.split import SPLITS, TEST, TRAIN, VAL

PREPARED_DIR, CLASSES_FILE = "prepared", "classes.json"  # the layout of raypipe.pipeline.prepare
CS = (0.01, 0.1, 1.0, 10.0, 100.0)
BASELINES = ("text", "image", "late_fusion")


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, S, S, 3]
    tokens: np.ndarray  # int [N, L], 0 = padding
    labels: np.ndarray  # int64 [N]


def _tensor_rows(column: pa.ChunkedArray, field: pa.Field) -> np.ndarray:
    """A Ray tensor column (read with or without Ray's extension types) -> ndarray [N, *shape]."""
    array = column.combine_chunks()
    if isinstance(array, pa.ExtensionArray):
        shape = tuple(array.type.shape)
        array = array.storage
    else:
        shape = tuple(json.loads((field.metadata or {}).get(b"ARROW:extension:metadata", b"[-1]")))
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), *shape)


def load_prepared(url: str, storage: StorageConfig | None = None) -> tuple[dict[str, Split], list[str]]:
    """The ok rows of a prepare output, per split, and its class list."""
    root = rfs.resolve(url, storage or StorageConfig())
    classes = json.loads(rfs.read_text(root.join(CLASSES_FILE)))
    prepared = root.join(PREPARED_DIR)
    files = sorted(
        i.path for i in prepared.fs.get_file_info(pafs.FileSelector(prepared.path, recursive=True))
        if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )
    columns = [schema.IMAGE, schema.TOKENS, schema.LABEL_ID, schema.SPLIT, schema.STATUS]
    table = pq.ParquetDataset(files, filesystem=prepared.fs).read(columns=columns)
    table = table.filter(pc.equal(table[schema.STATUS], schema.Status.OK.value))
    images = image_rows(table[schema.IMAGE])
    tokens = _tensor_rows(table[schema.TOKENS], table.schema.field(schema.TOKENS))
    labels = table[schema.LABEL_ID].to_numpy()
    split = np.asarray(table[schema.SPLIT].to_pylist(), dtype=object)
    return {s: Split(images[split == s], tokens[split == s], labels[split == s]) for s in SPLITS}, classes


def token_counts(tokens: np.ndarray, vocab_size: int):
    """Bag of token ids as a sparse count matrix [N, vocab_size]; padding (0) dropped."""
    from scipy.sparse import csr_matrix

    rows, cols = np.nonzero(tokens)
    values = np.ones(len(rows), dtype=np.float64)
    return csr_matrix((values, (rows, tokens[rows, cols])), shape=(len(tokens), vocab_size))


def _classifier(labels: np.ndarray, seed: int):
    """Logistic regression with C picked by stratified k-fold on the training labels (k <= 5)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    present = np.bincount(labels)
    present = present[present > 0]
    folds = min(5, int(present.min())) if len(present) > 1 else 0
    if folds < 2:
        return LogisticRegression(C=1.0, max_iter=5000)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return GridSearchCV(LogisticRegression(max_iter=5000), {"C": list(CS)}, cv=cv, scoring="accuracy")


def text_model(train: Split, vocab_size: int, seed: int = 0):
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfTransformer(sublinear_tf=True), _classifier(train.labels, seed))
    return model.fit(token_counts(train.tokens, vocab_size), train.labels)


def pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def image_model(train: Split, components: int = 100, seed: int = 0):
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline

    n_components = max(1, min(components, len(train.labels) - 1, train.images[0].size))
    model = make_pipeline(PCA(n_components, whiten=True, random_state=seed), _classifier(train.labels, seed))
    return model.fit(pixels(train.images), train.labels)


def probabilities(model, features, num_classes: int) -> np.ndarray:
    """predict_proba over every class id (classes absent from training get 0)."""
    out = np.zeros((features.shape[0], num_classes))
    out[:, model.classes_] = model.predict_proba(features)
    return out


def run_baselines(prepared: str, storage: StorageConfig | None = None, components: int = 100, seed: int = 0) -> dict:
    """Fits on the training split; ``results[split][baseline]``: accuracy, macro-F1 and confusion matrix on
    the validation split and, when there is one, the test split."""
    splits, classes = load_prepared(prepared, storage)
    train, val = splits[TRAIN], splits[VAL]
    if len(train.labels) == 0 or len(val.labels) == 0:
        raise ValueError(f"{prepared}: needs ok rows in the train and val splits (train {len(train.labels)}, "
                         f"val {len(val.labels)})")
    scored = {name: split for name, split in splits.items() if name != TRAIN and len(split.labels)}
    n = len(classes)
    vocab_size = int(max(split.tokens.max() for split in splits.values() if len(split.labels))) + 1
    text = text_model(train, vocab_size, seed)
    image = image_model(train, components, seed)
    results = {}
    for split_name, split in scored.items():
        probs = {
            "text": probabilities(text, token_counts(split.tokens, vocab_size), n),
            "image": probabilities(image, pixels(split.images), n),
        }
        probs["late_fusion"] = (probs["text"] + probs["image"]) / 2
        results[split_name] = {}
        for name in BASELINES:
            confusion = confusion_matrix(split.labels, probs[name].argmax(1), n)
            results[split_name][name] = {**summary(confusion), "confusion": confusion.tolist()}
    return {
        "prepared": prepared, "classes": classes, "rows": {name: len(split.labels) for name, split in splits.items()},
        "settings": {"pca_components": image[0].n_components_, "Cs": list(CS), "seed": seed,
                     "C_text": _chosen_c(text), "C_image": _chosen_c(image)},
        "results": results,
    }


def _chosen_c(model) -> float:
    final = model[-1]
    return float(final.best_params_["C"]) if hasattr(final, "best_params_") else float(final.C)


def table_markdown(result: dict) -> str:
    splits = [s for s in (VAL, TEST) if s in result["results"]]
    lines = ["| linear baseline | " + " | ".join(f"{s} accuracy | {s} macro-F1" for s in splits) + " |",
             "| --- |" + " --- | --- |" * len(splits)]
    names = {"text": "text: TF-IDF + logistic regression", "image": "image: pixels + PCA + logistic regression",
             "late_fusion": "late fusion: mean of the two probabilities"}
    for name in BASELINES:
        cells = [f"{result['results'][s][name]['accuracy']:.4f} | {result['results'][s][name]['macro_f1']:.4f}"
                 for s in splits]
        lines.append(f"| {names[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raypipe.tools.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("prepared", help="a jobs/prepare.py output (local path or URL)")
    p.add_argument("--output", help="folder (path or URL) for baselines.json and baselines.md")
    p.add_argument("--pca", type=int, default=100, help="PCA components of the image baseline (default 100)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    result = run_baselines(args.prepared, components=args.pca, seed=args.seed)
    table = table_markdown(result)
    print(", ".join(f"{name} {rows} rows" for name, rows in result["rows"].items()) + f"; {len(result['classes'])} classes")
    print(table, end="")
    if args.output:
        out = rfs.resolve(args.output, StorageConfig())
        rfs.write_text(out.join("baselines.json"), json.dumps(result, indent=1))
        rfs.write_text(out.join("baselines.md"), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
