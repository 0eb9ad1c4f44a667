"""The image-text classifier of Kim & Lee (2023), in one file read top to bottom.

    image uint8 [B, S, S, 3] -> ImageCNN (conv3x3 + ReLU + maxpool2 blocks, flatten or average) -> [B, F]
    tokens int  [B, L]       -> TextLSTMAttention (embed, LSTM, additive attention)           -> [B, D]
                                (text_bag_of_words: also the mean word embedding, [B, E]; D includes it)
    fusion_head "mlp" (the paper): concat [B, F + D] -> (dropout, FC + ReLU)* -> dropout, FC -> logits [B, C]
    fusion_head "sum": (dropout, FC + ReLU)*, dropout, FC per branch (each as the one-branch models' head)
        -> 2 s image logits + 2 (1 - s) text logits -> logits [B, C]
        (s = image_share: 0.5 in training, the plain sum; then fitted on validation, raypipe/calibration.py)
    text_linear: + a linear classifier on the text's distinct words [B, V] -> [B, C], added to the text logits
        (the text-only model's, the text branch's, or the mlp head's)

`mode` picks the ablation: "image" and "text" build only their branch, so every parameter takes part
in every forward pass (DDP needs no find_unused_parameters). No device or dtype is hard-coded:
the model follows its inputs' device and runs under torch.autocast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

MODES = ("fusion", "image", "text")
# A late-fusion model's state-dict keys per branch: its encoder and its classifier (FusionClassifier's order).
BRANCH_KEYS = {"image": ("image.", "branch_heads.0."), "text": ("text.", "branch_heads.1.", "text_linear.")}
DEFAULT_SEQ_LEN = 32  # the text transform's default max_len; only flops_per_sample needs a length
# Adam moves every weight by ~lr per step whatever its gradient's size, so scaling an output by k lets its
# weights reach k times further: a linear model on unit-norm features needs weights of several units, which
# lr 1e-3 would take longer to reach than the LSTM takes to overfit.
TEXT_LINEAR_SCALE = 30.0  # 1, 10 and 30 scored on validation: docs/examples/text_linear_scale.py


@dataclass
class ModelConfig:
    num_classes: int
    vocab_size: int  # including id 0 (padding) and id 1 (unknown)
    mode: str = "fusion"  # "fusion" | "image" | "text"
    image_size: int = 64
    conv_channels: tuple[int, ...] = (32, 64, 128)  # one conv3x3 + maxpool2 block per entry
    image_pool: str = "flatten"  # "flatten" (the paper: C x S/2^n x S/2^n features) | "avg" (C features)
    batch_norm: bool = False  # a departure from the paper's plain CNN, off by default
    embed_dim: int = 128
    lstm_hidden: int = 128  # per direction
    lstm_layers: int = 1
    bidirectional: bool = False
    embed_dropout: float = 0.0  # dropout on the word embeddings, the LSTM's input (a departure; the paper has none)
    text_bag_of_words: bool = False  # text features also hold the mean word embedding (a departure)
    text_linear: bool = False  # a linear classifier on the text's distinct words beside the text head (a departure)
    fc_dims: tuple[int, ...] = (256,)  # hidden FC layers after the concatenation
    dropout: float = 0.5  # before each FC layer
    modality_dropout: float = 0.0  # fusion, training only: share of samples that lose one branch (a departure)
    aux_heads: bool = False  # fusion: a linear classifier per branch, trained beside the fused one (a departure)
    fusion_head: str = "mlp"  # fusion: "mlp" on the concatenation (the paper) | "sum" of per-branch logits
    image_share: float = 0.5  # "sum": logits = 2 s image + 2 (1 - s) text; fitted on validation after training

    def __post_init__(self):
        self.conv_channels, self.fc_dims = tuple(self.conv_channels), tuple(self.fc_dims)  # lists from JSON
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.image_pool not in ("flatten", "avg") or self.fusion_head not in ("mlp", "sum"):
            raise ValueError(f"image_pool must be flatten or avg and fusion_head mlp or sum, got {self}")
        if not 0.0 <= self.image_share <= 1.0:
            raise ValueError(f"image_share must be in [0, 1], got {self.image_share}")
        if not (0.0 <= self.modality_dropout < 1.0 and 0.0 <= self.embed_dropout < 1.0):
            raise ValueError(f"modality_dropout and embed_dropout must be in [0, 1), got {self}")
        if self.num_classes < 1 or self.vocab_size < 2 or not self.conv_channels:
            raise ValueError(f"need num_classes >= 1, vocab_size >= 2 and conv blocks: {self}")
        if self.image_size >> len(self.conv_channels) < 1:
            raise ValueError(f"image_size {self.image_size} is too small for {len(self.conv_channels)} maxpool blocks")

    @property
    def late_fusion(self) -> bool:
        """Two branches whose logits are summed (weighted by image_share)."""
        return self.mode == "fusion" and self.fusion_head == "sum"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown ModelConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)


class ImageCNN(nn.Module):
    """uint8 (or float on the same 0-255 scale) images [B, S, S, 3] -> features [B, out_dim].

    The /255 and HWC -> CHW happen here so training and inference cannot disagree on them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        layers, in_ch, size = [], 3, config.image_size
        for out_ch in config.conv_channels:
            layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not config.batch_norm))  # BN has its own bias
            layers += [nn.BatchNorm2d(out_ch)] if config.batch_norm else []
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_ch, size = out_ch, size // 2
        self.blocks = nn.Sequential(*layers)
        self.average = config.image_pool == "avg"
        self.image_size, self.out_dim = config.image_size, in_ch * (1 if self.average else size * size)

    def forward(self, image: Tensor) -> Tensor:
        if image.ndim != 4 or tuple(image.shape[1:]) != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected images [B, {self.image_size}, {self.image_size}, 3], got {tuple(image.shape)}")
        x = image.permute(0, 3, 1, 2).float() / 255  # [B, 3, S, S]; a channels_last view, no copy
        x = self.blocks(x)  # [B, C, S/2^n, S/2^n]
        # Averaging over positions leaves C features instead of C x (S/2^n)^2 (128 vs 8,192 by default):
        # far fewer for a small training set to memorise, and the text branch's 128 are no longer dwarfed.
        return x.mean((2, 3)) if self.average else x.flatten(1)  # [B, out_dim]


class TextLSTMAttention(nn.Module):
    """Right-padded token ids [B, L] (0 = padding) -> (features [B, out_dim], attention [B, L]).

    Attention is additive (Bahdanau): score_t = v^T tanh(W h_t + b), softmax over the real tokens only.
    A text with no tokens gets all-zero attention and all-zero features rather than NaN."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.embed_dropout = nn.Dropout(config.embed_dropout)
        self.lstm = nn.LSTM(
            config.embed_dim, config.lstm_hidden, num_layers=config.lstm_layers, batch_first=True,
            bidirectional=config.bidirectional, dropout=config.dropout if config.lstm_layers > 1 else 0.0,
        )
        lstm_dim = config.lstm_hidden * (2 if config.bidirectional else 1)
        self.attn_proj = nn.Linear(lstm_dim, lstm_dim)  # W, b
        self.attn_score = nn.Linear(lstm_dim, 1, bias=False)  # v; a bias would cancel in the softmax
        self.bag_of_words = config.text_bag_of_words
        self.out_dim = lstm_dim + (config.embed_dim if self.bag_of_words else 0)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        B, L = tokens.shape
        lengths = (tokens != 0).sum(1)  # [B]
        # Packing makes the LSTM stop at each text's end, so trailing padding cannot change its output.
        # Empty texts are run for one (padding) step to keep pack_padded_sequence happy; the mask drops it.
        embedded = self.embed_dropout(self.embed(tokens))  # [B, L, E]
        packed = pack_padded_sequence(embedded, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=L)  # [B, L, D]
        scores = self.attn_score(torch.tanh(self.attn_proj(h))).squeeze(-1)  # [B, L]
        mask = torch.arange(L, device=tokens.device) < lengths[:, None]  # [B, L], True on real tokens
        # finfo.min rather than -inf: an all-masked row then softmaxes to finite values instead of NaN,
        # and multiplying by the mask sets padding (and empty rows) to exactly 0.
        scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
        weights = F.softmax(scores, dim=1) * mask  # [B, L]
        features = torch.bmm(weights.unsqueeze(1).to(h.dtype), h).squeeze(1)  # [B, D]
        if self.bag_of_words:
            # Keyword-list texts (alt-text, tags) carry their class in which words occur, not in their
            # order: a linear bag of words beats the LSTM on them. The mean embedding gives the head that path.
            mean = (embedded * mask[..., None]).sum(1) / lengths.clamp(min=1)[:, None]  # [B, E]
            features = torch.cat([features, mean.to(features.dtype)], 1)  # [B, D + E]
        return features, weights


class FusionClassifier(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.image = ImageCNN(config) if config.mode in ("fusion", "image") else None
        self.text = TextLSTMAttention(config) if config.mode in ("fusion", "text") else None
        branches = [branch for branch in (self.image, self.text) if branch is not None]
        self.head = None if config.late_fusion else self._mlp(sum(branch.out_dim for branch in branches), config)
        # Wide and deep (Cheng et al. 2016): logistic regression on which words occur, the reader that wins
        # on keyword lists (alt-text, tags), learns beside the LSTM; row w of the table holds word w's logits.
        self.text_linear = None
        if config.text_linear and self.text is not None:
            self.text_linear = nn.Embedding(config.vocab_size, config.num_classes, padding_idx=0)
        # One classifier per branch, the head a one-branch model has. With fusion_head "sum" their logits
        # are added to make the prediction (late fusion); trained separately (optim.branch_training), each
        # branch learns as if alone; with aux_heads each also has its own loss beside a joint one (Wang et
        # al. 2020, "What makes training multi-modal classification networks hard?"); without "sum" they
        # are used in training only.
        self.branch_heads = None
        if config.mode == "fusion" and (config.aux_heads or config.late_fusion):
            self.branch_heads = nn.ModuleList(self._mlp(branch.out_dim, config) for branch in branches)
        self.apply(_init_weights)
        # Near-zero logits at the start: the initial loss is ln(num_classes), not a confident guess.
        for classifier in [*([self.head] if self.head else []), *(self.branch_heads or [])]:
            nn.init.normal_(classifier[-1].weight, std=0.01)
        if self.text_linear is not None:
            nn.init.zeros_(self.text_linear.weight)

    @staticmethod
    def _mlp(in_dim: int, config: ModelConfig) -> nn.Sequential:
        layers = []
        for dim in config.fc_dims:
            layers += [nn.Dropout(config.dropout), nn.Linear(in_dim, dim), nn.ReLU(inplace=True)]
            in_dim = dim
        return nn.Sequential(*layers, nn.Dropout(config.dropout), nn.Linear(in_dim, config.num_classes))

    def forward(self, image: Tensor | None, tokens: Tensor | None, with_branches: bool = False):
        """Logits [B, num_classes]; with ``with_branches`` (training), also the per-branch classifiers' logits
        (a list: empty for a one-branch model and for the mlp head without aux heads)."""
        logits, branch_logits, _ = self._logits(image, tokens)
        return (logits, branch_logits) if with_branches else logits

    def branch_logits(self, image: Tensor, tokens: Tensor) -> list[Tensor]:
        """A late-fusion model's per-branch logits, [image [B, C], text [B, C]] (validation fits their weights)."""
        return self._logits(image, tokens)[1]

    def forward_with_attention(self, image: Tensor | None, tokens: Tensor | None) -> tuple[Tensor, Tensor | None]:
        logits, _, attention = self._logits(image, tokens)
        return logits, attention  # [B, num_classes], [B, L] | None

    def _logits(self, image: Tensor | None, tokens: Tensor | None) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """(logits [B, C], per-branch logits, attention [B, L] | None): every forward path's one pass."""
        features, attention = self._features(image, tokens)
        return *self._fuse(features, self._text_linear(tokens)), attention

    def _features(self, image: Tensor | None, tokens: Tensor | None) -> tuple[list[Tensor], Tensor | None]:
        features, attention = [], None
        if self.image is not None:
            features.append(self.image(image))  # [B, F]
        if self.text is not None:
            text_features, attention = self.text(tokens)  # [B, D], [B, L]
            features.append(text_features)
        return features, attention

    def _text_linear(self, tokens: Tensor | None) -> Tensor | None:
        """The linear text classifier's logits [B, C]: the mean of the rows of the text's distinct words,
        times sqrt(their number) (logistic regression on the L2-normalised word-presence vector)."""
        if self.text_linear is None:
            return None
        words, _ = tokens.sort(1)  # [B, L]; repeats side by side
        words[:, 1:] = words[:, 1:].masked_fill(words[:, 1:] == words[:, :-1], 0)  # a repeat counts once
        distinct = (words != 0).sum(1, keepdim=True).clamp(min=1)  # [B, 1]
        # padding's row is zero; an empty text gets zero logits
        return TEXT_LINEAR_SCALE * self.text_linear(words).sum(1) / distinct.sqrt()  # [B, C]

    def _fuse(self, features: list[Tensor], text_linear: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """(logits [B, C], per-branch logits [B, C] each: empty for a one-branch model)."""
        branch_logits = [head(f) for head, f in zip(self.branch_heads or [], features)]
        if text_linear is not None and branch_logits:
            branch_logits[-1] = branch_logits[-1] + text_linear  # the text branch's classifier
        if self.training and self.config.modality_dropout > 0 and len(features) == 2:
            image_kept, text_kept = self._one_branch_dropped(features[0])
            if self.config.late_fusion:  # features and logits alike: a dropped branch adds nothing to the sum
                branch_logits = [branch_logits[0] * image_kept, branch_logits[1] * text_kept]
            else:
                features = [features[0] * image_kept, features[1] * text_kept]
                text_linear = text_linear * text_kept if text_linear is not None else None
        if self.config.late_fusion:
            return late_sum(*branch_logits, self.config.image_share), branch_logits
        logits = self.head(torch.cat(features, dim=1))
        return (logits if text_linear is None else logits + text_linear), branch_logits

    def _one_branch_dropped(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Masks [B, 1] (image kept, text kept) that drop the image or the text (a coin flip which) of a
        random share of the samples, so neither branch can lean on the other: the one that fits the
        training set first (here the CNN) would otherwise leave the other little gradient to learn from."""
        B = like.shape[0]
        dropped = torch.rand(B, 1, device=like.device) < self.config.modality_dropout  # [B, 1]
        image_side = torch.rand(B, 1, device=like.device) < 0.5
        return ~(dropped & image_side), ~(dropped & ~image_side)


def late_sum(image_logits: Tensor, text_logits: Tensor, image_share) -> Tensor:
    """Late fusion: 2 s image + 2 (1 - s) text; s = 0.5 is the plain sum (a float, or a tensor that broadcasts)."""
    return 2 * image_share * image_logits + 2 * (1 - image_share) * text_logits


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        # He init: every conv and hidden FC feeds a ReLU (the attention's tanh copes with it too).
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.1)
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()  # padding embeds to 0
    elif isinstance(module, nn.LSTM):
        for name, param in module.named_parameters():
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(param)
            elif name.startswith("weight_hh"):
                nn.init.orthogonal_(param)  # keeps the recurrence's gain near 1 over many steps
            else:  # biases, gates ordered (input, forget, cell, output): forget bias 1 remembers by default
                nn.init.zeros_(param)
                if name.startswith("bias_ih"):
                    param.data[module.hidden_size : 2 * module.hidden_size] = 1.0


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(config: ModelConfig, seq_len: int = DEFAULT_SEQ_LEN) -> int:
    """2 x multiply-adds of one sample's forward pass (at inference): convs, LSTM at full length `seq_len`
    (packing skips padding, so real texts cost less), attention and FC layers. Bias adds,
    activations, pooling, BatchNorm, softmax, the embedding lookups and the text_linear sum are left out (<1%)."""
    macs, features = 0, []  # features: each branch's feature size
    if config.mode in ("fusion", "image"):
        in_ch, size = 3, config.image_size
        for out_ch in config.conv_channels:
            macs += size * size * out_ch * in_ch * 9  # 'same' conv at full resolution, before the pool
            in_ch, size = out_ch, size // 2
        features.append(in_ch * (1 if config.image_pool == "avg" else size * size))
    if config.mode in ("fusion", "text"):
        H, directions = config.lstm_hidden, 2 if config.bidirectional else 1
        in_dim = config.embed_dim
        for _ in range(config.lstm_layers):
            macs += seq_len * directions * 4 * H * (in_dim + H)  # four gates, input + recurrent matmuls
            in_dim = directions * H
        macs += seq_len * (in_dim * in_dim + in_dim + in_dim)  # W h_t, v^T tanh(.), weighted sum
        features.append(in_dim + (config.embed_dim if config.text_bag_of_words else 0))
    for in_dim in features if config.late_fusion else [sum(features)]:  # an mlp per branch, or one on the concat
        for dim in (*config.fc_dims, config.num_classes):
            macs += in_dim * dim
            in_dim = dim
    return 2 * macs
