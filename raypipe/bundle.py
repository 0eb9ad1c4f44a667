"""The model bundle: a directory at any URL holding everything needed to label new pairs exactly
as the model was trained.

    model.pt      a plain state_dict, loaded with torch.load(weights_only=True): never unpickles objects
    config.json   model hyper-parameters + preprocessing (image and text options) + the precision the
                  model was trained and validated in (``precision``: fp32, bf16 or fp16; absent = fp32)
                  + ``temperature``: probabilities are softmax(logits / temperature), the temperature
                  fitted on the validation split (raypipe/calibration.py; absent = 1, uncalibrated)
    vocab.json    the vocabulary (0 pad, 1 unknown)
    classes.json  class names; a label id is a position in it
    metrics.json  final and per-epoch metrics of the run that produced it
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass, field

import torch

from raypipe.config import StorageConfig
from raypipe.errors import UserError
from raypipe.io import fs as rfs
from raypipe.model import FusionClassifier, ModelConfig
from raypipe.transforms.image import ImageOptions
from raypipe.transforms.text import TextOptions
from raypipe.transforms.vocab import Vocabulary

FORMAT_VERSION = 1
WEIGHTS, CONFIG, VOCAB, CLASSES, METRICS = "model.pt", "config.json", "vocab.json", "classes.json", "metrics.json"
FP32 = {"trained": "fp32", "validated": "fp32"}  # bundles written before the precision was recorded


class BundleError(UserError, RuntimeError):
    """A bundle that cannot be loaded; the message names the URL and the problem."""


@dataclass
class Bundle:
    model_config: ModelConfig
    image: ImageOptions
    text: TextOptions
    vocab: Vocabulary
    classes: tuple[str, ...]
    state_dict: dict[str, torch.Tensor]
    metrics: dict
    url: str = ""
    identity: str = ""  # sha256 of model.pt (first 16 hex digits): which model labeled a row
    precision: dict[str, str] = field(default_factory=lambda: dict(FP32))  # {"trained": ..., "validated": ...}
    temperature: float = 1.0  # calibrated probabilities: softmax(logits / temperature)

    def build_model(self, device: torch.device | str = "cpu") -> FusionClassifier:
        model = FusionClassifier(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


def _weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
    return buffer.getvalue()


def save_bundle(url: str, storage: StorageConfig, bundle: Bundle) -> str:
    """Writes the bundle; returns its identity."""
    loc = rfs.resolve(url, storage)
    weights = _weights_bytes(bundle.state_dict)
    config = {
        "format_version": FORMAT_VERSION,
        "model": bundle.model_config.to_dict(),
        "image": bundle.image.model_dump(),
        "text": bundle.text.model_dump(),
        "precision": bundle.precision,
        "temperature": bundle.temperature,
    }
    rfs.write_bytes(loc.join(WEIGHTS), weights)
    rfs.write_text(loc.join(CONFIG), json.dumps(config, indent=1))
    rfs.write_text(loc.join(VOCAB), bundle.vocab.to_json())
    rfs.write_text(loc.join(CLASSES), json.dumps(list(bundle.classes), ensure_ascii=False, indent=1))
    rfs.write_text(loc.join(METRICS), json.dumps(bundle.metrics, indent=1))
    return hashlib.sha256(weights).hexdigest()[:16]


def _load_weights(weights: bytes, url: str) -> dict[str, torch.Tensor]:
    """weights_only=True: a crafted model.pt cannot run code when it is loaded; it is refused instead."""
    try:
        return torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message goes on to suggest weights_only=False, exactly what must not be done here.
        refused = str(e).split("WeightsUnpickler error:")[-1].strip().split(". ")[0]
        raise BundleError(
            f"{url} holds more than plain tensors ({refused}); refused, since loading it could run code. "
            "Use a bundle written by raypipe's train job."
        ) from None


def _temperature(value, url: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise BundleError(f"{url}: config.json's temperature must be a positive number, got {value!r}")
    return float(value)


def load_bundle(url: str, storage: StorageConfig) -> Bundle:
    loc = rfs.resolve(url, storage)
    try:
        config = json.loads(rfs.read_text(loc.join(CONFIG)))
        if config.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{url}: bundle format {config.get('format_version')!r}, this raypipe reads {FORMAT_VERSION}")
        with loc.fs.open_input_stream(loc.join(WEIGHTS).path) as f:
            weights = f.read()
        state_dict = _load_weights(weights, loc.join(WEIGHTS).url)
        return Bundle(
            model_config=ModelConfig.from_dict(config["model"]),
            image=ImageOptions.model_validate(config["image"]),
            text=TextOptions.model_validate(config["text"]),
            vocab=Vocabulary.from_json(rfs.read_text(loc.join(VOCAB))),
            classes=tuple(json.loads(rfs.read_text(loc.join(CLASSES)))),
            state_dict=state_dict,
            metrics=json.loads(rfs.read_text(loc.join(METRICS))),
            url=url,
            identity=hashlib.sha256(weights).hexdigest()[:16],
            precision={**FP32, **config.get("precision", {})},
            temperature=_temperature(config.get("temperature", 1.0), url),
        )
    except rfs.StorageError as e:
        raise BundleError(f"cannot load the model bundle at {url}: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, OSError, pickle.UnpicklingError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{url} is not a valid raypipe model bundle: {type(e).__name__}: {e}") from None
