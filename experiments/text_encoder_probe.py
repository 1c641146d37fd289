"""Does the frozen text encoder separate the findings' words? A linear probe of its prompt embeddings.

The tiny base's text encoder was pretrained with the UNet on shape-world captions and stays frozen in
every fine-tune (Dutt et al. 2024 freeze it too). If its embeddings of radiology reports do not carry
which findings a report names, no UNet capacity can draw the right findings from them, and the
image-text score stays near Freeze's whatever is trained. This probes it: for each of the 7 phantom
findings, a logistic regression (L2) on the mean of the encoder's hidden states over a report's tokens,
fitted on training-split reports and scored by AUROC on held-out patients' reports. Two references on
the same footing: the same probe on shape-world captions for 7 shape words (what the encoder was trained
to tell apart), and a bag-of-tokens probe on the reports (what a linear reader of the words themselves
gets: the ceiling a text encoder could pass on).

    python experiments/text_encoder_probe.py --out experiments/results/text_encoder_probe
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SHAPE_WORDS = ("ring", "blob", "crescent", "cross", "triangle", "circle", "rectangle")


def mean_embeddings(pipe, texts: list[str], batch: int = 256) -> torch.Tensor:
    """Mean of the text encoder's last hidden states over each text's real tokens (no padding)."""
    out = []
    tok = pipe.tokenizer
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], padding="max_length", truncation=True,
                      max_length=tok.model_max_length, return_tensors="pt")  # fmt: skip
            hidden = pipe.text_encoder(enc.input_ids)[0]
            mask = enc.attention_mask.unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out).double()


def bag_of_tokens(pipe, texts: list[str]) -> torch.Tensor:
    """Counts of each token id per text (the words themselves, as a linear reader sees them)."""
    ids = pipe.tokenizer(
        texts, truncation=True, max_length=pipe.tokenizer.model_max_length
    ).input_ids
    bag = torch.zeros(len(texts), len(pipe.tokenizer), dtype=torch.float64)
    for row, seq in enumerate(ids):
        for t in seq:
            bag[row, t] += 1
    return bag


def probe_auroc(x_train, y_train, x_test, y_test, l2: float = 1e-3) -> float:
    """AUROC on the test rows of an L2 logistic regression fitted on the training rows (standardised)."""
    from capsearch.metrics.scorer import auroc

    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-8)
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    w = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=200, line_search_fn="strong_wolfe")
    y = y_train.double()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, y) + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return auroc(b @ w + c, y_test)


def main() -> None:
    from capsearch.datasets.folder import read_metadata
    from capsearch.models.load import caption_corpus, load_pipeline
    from capsearch.worlds.phantom import FINDINGS, write_phantom_dataset

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument(
        "--data", type=Path, default=None, help="phantom folder (default: a temporary one)"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:  # the images are not needed, only the reports
        data = args.data or Path(tmp) / "data"
        if not (data / "metadata.jsonl").is_file():
            write_phantom_dataset(data, patients=args.patients, size=32, seed=args.seed)
        records = read_metadata(data)
    pipe = load_pipeline("tiny")
    # One row per distinct report, split by the patient's split (held-out patients score the probe).
    seen: dict[str, dict] = {}
    for r in records:
        seen.setdefault(r["text"], r)
    rows = list(seen.values())
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] != "train"]
    result: dict = {"reports": {"train": len(train), "test": len(test)}, "findings": {}}
    emb_train = mean_embeddings(pipe, [r["text"] for r in train])
    emb_test = mean_embeddings(pipe, [r["text"] for r in test])
    bag_train = bag_of_tokens(pipe, [r["text"] for r in train])
    bag_test = bag_of_tokens(pipe, [r["text"] for r in test])
    for finding in FINDINGS:
        y_train = torch.tensor([finding in r["findings"] for r in train])
        y_test = torch.tensor([finding in r["findings"] for r in test])
        result["findings"][finding] = {
            "positives_test": int(y_test.sum()),
            "encoder_auroc": probe_auroc(emb_train, y_train, emb_test, y_test),
            "bag_of_tokens_auroc": probe_auroc(bag_train, y_train, bag_test, y_test),
        }
    captions = list(dict.fromkeys(caption_corpus(n_shapes=3000)[:3000]))
    half = len(captions) // 2
    cap_train, cap_test = captions[:half], captions[half:]
    sh_train, sh_test = mean_embeddings(pipe, cap_train), mean_embeddings(pipe, cap_test)
    result["shape_words"] = {}
    for word in SHAPE_WORDS:
        y_train = torch.tensor([word in c.split() or f"{word}s" in c.split() for c in cap_train])
        y_test = torch.tensor([word in c.split() or f"{word}s" in c.split() for c in cap_test])
        result["shape_words"][word] = {
            "positives_test": int(y_test.sum()),
            "encoder_auroc": probe_auroc(sh_train, y_train, sh_test, y_test),
        }
    result["seconds"] = round(time.time() - t0, 1)
    result["command"] = (
        f"python experiments/text_encoder_probe.py --out {args.out} --patients {args.patients} "
        f"--seed {args.seed}"
    )
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    for name, v in result["findings"].items():
        print(f"{name:16s} encoder {v['encoder_auroc']:.3f}  bag-of-tokens {v['bag_of_tokens_auroc']:.3f}"
              f"  (test positives {v['positives_test']})")  # fmt: skip
    for name, v in result["shape_words"].items():
        print(
            f"shape {name:10s} encoder {v['encoder_auroc']:.3f}  (test positives {v['positives_test']})"
        )


if __name__ == "__main__":
    main()
