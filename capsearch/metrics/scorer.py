"""Phantom scorer: a small CNN that reads findings off phantom chest X-rays (features, alignment score)."""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from capsearch.datasets.folder import ImageCaptionDataset, read_metadata
from capsearch.errors import UserError
from capsearch.metrics.fingerprint import weights_fingerprint
from capsearch.progress import rich_bar
from capsearch.worlds.phantom import FINDINGS, findings_from_text, write_phantom_dataset

SCORER_DIR = Path(__file__).parents[1] / "assets" / "scorer"
WEIGHTS_FILE = "scorer.safetensors"
CONFIG_FILE = "scorer.json"


class PhantomScorer(nn.Module):
    """Four conv blocks → global average pool (penultimate features) → one logit per finding."""

    def __init__(
        self, findings: Sequence[str], channels: Sequence[int] = (32, 64, 96, 128), size: int = 32
    ) -> None:
        super().__init__()
        self.findings = tuple(findings)
        self.channels = tuple(int(c) for c in channels)
        self.size = int(size)
        blocks, c_in = [], 1
        for c_out in self.channels:
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.trunk = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, len(self.findings))

    @property
    def config(self) -> dict:
        """Constructor arguments, as saved next to the weights."""
        return {"findings": list(self.findings), "channels": list(self.channels), "size": self.size}

    @property
    def feature_dim(self) -> int:
        """Width of the penultimate features."""
        return self.channels[-1]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1] → grayscale [N, 1, size, size] on the model's device."""
        if images.ndim != 4:
            raise UserError(
                f"phantom scorer expects images [N, C, H, W], got {tuple(images.shape)}"
            )
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            # Antialiased bicubic, as Pillow's resize that made the training images (capsearch.datasets.folder):
            # a bilinear resize shifted held-out finding agreement from 0.68 to 0.49 in one measurement.
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True)
            x = x.clamp(-1, 1)
        return x.to(next(self.parameters()).device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, D] of prepared images (non-negative, globally pooled)."""
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Finding logits [N, len(findings)] of prepared images."""
        return self.head(self.embed(x))

    @torch.no_grad()
    def _batched(self, images: torch.Tensor, batch_size: int, logits: bool) -> torch.Tensor:
        """Features or logits of raw images, in eval mode and batches."""
        was_training = self.training
        self.eval()
        try:
            out = []
            for i in range(0, len(images), batch_size):
                x = self.prepare(images[i : i + batch_size])
                out.append((self(x) if logits else self.embed(x)).float().cpu())
        finally:
            self.train(was_training)
        width = len(self.findings) if logits else self.feature_dim
        return torch.cat(out) if out else torch.zeros(0, width)

    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features [N, D] (float32, CPU) of images in [-1, 1]."""
        return self._batched(images, batch_size, logits=False)

    def probabilities(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Sigmoid probabilities [N, F] of each finding."""
        return torch.sigmoid(self._batched(images, batch_size, logits=True))

    def predict_findings(self, images: torch.Tensor, batch_size: int = 256) -> list[set[str]]:
        """The findings seen in each image (probability > 0.5)."""
        probs = self.probabilities(images, batch_size)
        return [
            {f for f, p in zip(self.findings, row.tolist(), strict=True) if p > 0.5}
            for row in probs
        ]

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-sample agreement [N]: Jaccard index between findings seen in each image and named in its prompt."""
        named = [set(findings_from_text(p)) & set(self.findings) for p in prompts]
        return finding_agreement(self.predict_findings(images), named)

    def fingerprint(self) -> str:
        """SHA-256 of the configuration and every weight and buffer."""
        return weights_fingerprint(self, json.dumps(self.config, sort_keys=True))


def finding_agreement(predicted: Sequence[set[str]], named: Sequence[set[str]]) -> torch.Tensor:
    """Jaccard |P ∩ T| / |P ∪ T| per sample, 1 when both sets are empty (a normal study read as normal)."""
    values = [
        len(p & t) / len(p | t) if (p or t) else 1.0 for p, t in zip(predicted, named, strict=True)
    ]
    return torch.tensor(values, dtype=torch.float32)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties); NaN with one class only."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Tied scores share the mean of their ranks.
    uniq, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


@functools.lru_cache(maxsize=1)
def phantom_world_digest() -> str:
    """SHA-256 of what the phantom world renders: a scorer is only valid for the world it was trained on.

    A fixed small data set (32 and 64 px) is rendered and its records and decoded pixels hashed: an edit
    that changes no pixel and no caption keeps the shipped scorer valid. About a second, once a process.
    """
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        for size in (32, 64):
            root = Path(tmp) / str(size)
            write_phantom_dataset(root, patients=6, size=size, seed=0, dup_fraction=0.2,
                                  dup_copies=2, held_out_images=4)  # fmt: skip
            for record in read_metadata(root):
                digest.update(json.dumps(record, sort_keys=True).encode())
                with Image.open(root / record["file_name"]) as image:
                    digest.update(np.asarray(image).tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_scorer(model: PhantomScorer, out_dir: Path, report: dict) -> Path:
    """Write scorer.safetensors and scorer.json (config, report, sha256 of the weights)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    # float16 on disk halves the shipped file; weights are read back into the float32 model.
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(weights))
    weights.chmod(0o644)
    meta = {"config": model.config, **report, "sha256": _file_sha256(weights)}
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def load_scorer(
    path: Path | str | None = None, device: str | torch.device = "cpu"
) -> PhantomScorer:
    """Load a trained phantom scorer (default: the one shipped under capsearch/assets/scorer/)."""
    folder = Path(path) if path is not None else SCORER_DIR
    if folder.suffix == ".safetensors" or folder.name == CONFIG_FILE:
        folder = folder.parent
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not config.is_file():
        raise UserError(
            f"phantom scorer not found in {folder} (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
            "run `capsearch pretrain scorer` to train it"
        )
    try:
        meta = json.loads(config.read_text())
        cfg = meta["config"]
        model = PhantomScorer(cfg["findings"], cfg["channels"], cfg["size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"{config} is not a phantom scorer description") from None
    expected = meta.get("sha256")
    if expected and _file_sha256(weights) != expected:
        raise UserError(
            f"{weights} does not match the sha256 recorded in {config}; retrain or restore it"
        )
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as exc:
        raise UserError(
            f"cannot load phantom scorer weights {weights}: {str(exc).splitlines()[0]}"
        ) from None
    model.report = {k: v for k, v in meta.items() if k != "config"}
    if meta.get("world_sha256") and meta["world_sha256"] != phantom_world_digest():
        warnings.warn(
            f"phantom scorer in {folder} was trained on another version of the phantom world; "
            "retrain it with `capsearch pretrain scorer`",
            stacklevel=2,
        )
    return model.to(device).eval()


def _split_tensors(data_dir: Path, split: str, size: int, findings: Sequence[str]):
    """Images [N, 1, size, size] and multi-hot labels [N, F] of one split of a phantom dataset."""
    dataset = ImageCaptionDataset(data_dir, split=split, size=size)
    if len(dataset) == 0:
        return torch.zeros(0, 1, size, size), torch.zeros(0, len(findings))
    pairs = [(dataset.load(i), rec) for i, rec in enumerate(dataset.records)]
    pairs = [(image, rec) for image, rec in pairs if image is not None]  # skip unreadable files
    if not pairs:
        return torch.zeros(0, 1, size, size), torch.zeros(0, len(findings))
    images = torch.stack([image for image, _ in pairs])
    labels = torch.tensor(
        [[float(f in set(rec.get("findings") or [])) for f in findings] for _, rec in pairs]
    )
    return images, labels


def _dataset_summary(data_dir: Path) -> dict:
    """Patients, images and metadata hash of the training dataset, for the record."""
    records = read_metadata(data_dir)
    return {
        "patients": len({r.get("patient_id") for r in records}),
        "images": len(records),
        "metadata_sha256": _file_sha256(data_dir / "metadata.jsonl"),
    }


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small shifts, contrast/brightness jitter and pixel noise, so generated images are read like real ones."""
    n = x.shape[0]
    pad = 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    x = padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
    scale = 1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 2
    shift = 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 2
    noise = 0.05 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return (x * scale + shift + noise).clamp(-1, 1)


def evaluate_scorer(model: PhantomScorer, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Held-out AUROC per finding, their macro mean, and finding agreement of real images with their labels."""
    probs = model.probabilities(images)
    per_finding = {f: auroc(probs[:, i], labels[:, i]) for i, f in enumerate(model.findings)}
    valid = [v for v in per_finding.values() if v == v]
    named = [
        {f for f, y in zip(model.findings, row.tolist(), strict=True) if y > 0.5} for row in labels
    ]
    predicted = [
        {f for f, p in zip(model.findings, row.tolist(), strict=True) if p > 0.5} for row in probs
    ]
    return {
        "auroc": {f: (round(v, 4) if v == v else None) for f, v in per_finding.items()},
        "auroc_macro": round(sum(valid) / len(valid), 4) if valid else None,
        "agreement_real": round(float(finding_agreement(predicted, named).mean()), 4),
    }


def train_scorer(
    data_dir: Path | str,
    out_dir: Path | str,
    epochs: int = 40,
    size: int = 32,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    command: str | None = None,
) -> dict:
    """Train the phantom scorer on a phantom dataset's train split, save it, and return its report."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not (data_dir / "metadata.jsonl").is_file():
        raise UserError(f"{data_dir} is not a phantom dataset (no metadata.jsonl)")
    if epochs < 1 or size < 8 or batch_size < 2:
        raise UserError("train_scorer needs epochs ≥ 1, size ≥ 8 and batch_size ≥ 2")
    started = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = _split_tensors(data_dir, "train", size, FINDINGS)
    eval_split = "test"
    eval_x, eval_y = _split_tensors(data_dir, eval_split, size, FINDINGS)
    if len(eval_x) == 0:
        eval_split = "validate"
        eval_x, eval_y = _split_tensors(data_dir, eval_split, size, FINDINGS)
    if len(train_x) < batch_size or len(eval_x) == 0:
        raise UserError(
            f"{data_dir} has too few images to train the scorer "
            f"({len(train_x)} train, {len(eval_x)} held out)"
        )

    model = PhantomScorer(FINDINGS, size=size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(train_x) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, lr, total_steps=epochs * steps_per_epoch
    )
    bar = rich_bar(progress, epochs * steps_per_epoch, "training phantom scorer")
    losses = []
    model.train()
    for _epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=gen)
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            logits = model(_augment(train_x[idx], gen))
            loss = F.binary_cross_entropy_with_logits(logits, train_y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            running += float(loss.detach())
            if bar is not None:
                bar.advance(bar.task_ids[0])
        losses.append(round(running / steps_per_epoch, 4))
    if bar is not None:
        bar.stop()
    model.eval()
    report = {
        **evaluate_scorer(model, eval_x, eval_y),
        "eval_split": eval_split,
        "n_train": len(train_x),
        "n_eval": len(eval_x),
        "epoch_losses": losses,
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": {
            "data_dir": str(data_dir),
            "epochs": epochs,
            "size": size,
            "seed": seed,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "torch": torch.__version__,
        },
        "dataset": _dataset_summary(data_dir),
        "world_sha256": phantom_world_digest(),
        "command": command
        or f"capsearch.metrics.scorer.train_scorer({str(data_dir)!r}, {str(out_dir)!r}, epochs={epochs}, "
        f"size={size}, seed={seed})",
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_scorer(model, out_dir, report)
    return json.loads((out_dir / CONFIG_FILE).read_text())
