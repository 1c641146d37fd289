"""Trainable parameters and delta sizes of each PEFT method on SD v1.5's UNet shapes and on the tiny UNet.

Usage: python experiments/method_sizes.py  (prints the Markdown tables pasted into docs/methods.md)

SD v1.5 is built from SD15_UNET_CONFIG on the meta device (no weights, no memory), so its delta size is
4 bytes per trainable parameter (fp32). On the tiny UNet the delta is really written with save_delta and
the size of delta.safetensors is measured.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from capsearch.commands.methods import human_bytes, method_size, unet_factory
from capsearch.methods import apply_methods
from capsearch.models.delta import DELTA_FILE, save_delta

# (label, spec, published figure or "")
ROWS: list[tuple[str, object, str]] = [
    ("freeze", {"method": "freeze"}, ""),
    ("full", {"method": "full"}, "100%"),
    ("attention (Attn Tuning: whole attention blocks)", {"method": "attention"}, ""),
    ("attn_proj (q/k/v/out, self+cross)", {"method": "attn_proj"}, ""),
    ("attn_proj, cross only", {"method": "attn_proj", "which": "cross"}, ""),
    ("bitfit", {"method": "bitfit"}, ""),
    ("norm", {"method": "norm"}, ""),
    ("difffit (γ on attn1/attn2/ff)", {"method": "difffit"}, "≈0.12% (DiT-XL/2, Xie et al.)"),
    (
        "difffit, + resnet γ",
        {"method": "difffit", "gamma_on": ["attn1", "attn2", "ff", "resnet"]},
        "",
    ),
    ("difffit, scalar γ", {"method": "difffit", "gamma_shape": "scalar"}, ""),
    ("svdiff (all Linear/Conv2d + norm shifts)", {"method": "svdiff"}, "≈1 MB (Han et al.)"),
    ("svdiff, Linear/Conv2d only", {"method": "svdiff", "shift_norms": False}, ""),
    ("lora r4 on attention (`*:*_attn`)", {"method": "lora", "units": "*:*_attn"}, "≈3.2 MB"),
    ("lora r4, all Linear/Conv2d", {"method": "lora"}, ""),
    ("loha r4 on attention", {"method": "loha", "units": "*:*_attn"}, ""),
    ("lokr r4 on attention", {"method": "lokr", "units": "*:*_attn"}, ""),
    ("oft b32 on attention", {"method": "oft", "units": "*:*_attn"}, ""),
    ("MemControl (Dutt et al. 2024, searched mask)", None, "0.019% (not reproduced here)"),
]


def measured_bytes(make_unet, spec) -> int:
    """Size of delta.safetensors written by save_delta for the spec on a fresh UNet."""
    unet = make_unet()
    applied = apply_methods(unet, spec)
    with tempfile.TemporaryDirectory() as tmp:
        save_delta(unet, tmp, applied=applied)
        return (Path(tmp) / DELTA_FILE).stat().st_size


def table(model: str, measure: bool) -> str:
    """One Markdown table of method sizes on a model (published figures only beside SD v1.5's)."""
    make_unet = unet_factory(model)
    size_header = "delta.safetensors (measured)" if measure else "delta (fp32)"
    published_header = "" if measure else " published |"
    lines = [
        f"| method | trainable | % of UNet | {size_header} |{published_header}",
        "|---|---:|---:|---:|" + ("" if measure else "---|"),
    ]
    for label, spec, published in ROWS:
        tail = "" if measure else f" {published} |"
        if spec is None:
            if not measure:
                lines.append(f"| {label} | | | |{tail}")
            continue
        trainable, total = method_size(make_unet, spec)
        size = measured_bytes(make_unet, spec) if measure else 4 * trainable
        lines.append(
            f"| {label} | {trainable:,} | {100 * trainable / total:.4f} | {human_bytes(size)} |{tail}"
        )
    return "\n".join(lines)


def main() -> None:
    """Print the SD v1.5 and tiny tables."""
    logging.getLogger("capsearch.methods").setLevel(logging.ERROR)
    for model, title, measure in (
        ("sd15-config", "Stable Diffusion v1.5 UNet (shapes from SD15_UNET_CONFIG)", False),
        ("tiny", "Tiny phantom-world UNet (build_tiny_unet)", True),
    ):
        total = sum(p.numel() for p in unet_factory(model)().parameters())
        print(f"### {title}: {total:,} parameters\n")
        print(table(model, measure=measure) + "\n")


if __name__ == "__main__":
    main()
