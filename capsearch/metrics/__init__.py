"""Evaluation metrics (FID, KID, AMD, extraction, denoising strength, alignment) and intervals."""

from capsearch.metrics.alignment import ImageTextScorer, alignment_score, alignment_scores
from capsearch.metrics.amd import amd, nearest_train
from capsearch.metrics.denoising import (
    denoising_strength,
    denoising_strength_per_prompt,
    threshold_scores,
)
from capsearch.metrics.extraction import (
    PHANTOM_THRESHOLD,
    ExtractionResult,
    extraction_attack,
    novelty_floor,
    prompt_cliques,
    tiled_distance,
)
from capsearch.metrics.fid import (
    frechet_distance,
    frechet_distance_from_stats,
    frechet_distance_to,
    gaussian_stats,
)
from capsearch.metrics.intervals import (
    cluster_bootstrap,
    cluster_bootstrap_ratio,
    extraction_interval,
    jackknife_interval,
    noise_floor,
    prompt_clusters,
    seed_interval,
    wilson_interval,
)
from capsearch.metrics.kid import kernel_inception_distance, kernel_inception_distance_to
from capsearch.metrics.memorisation import memorisation_probe, memorised_captions

__all__ = [
    "PHANTOM_THRESHOLD",
    "ExtractionResult",
    "ImageTextScorer",
    "alignment_score",
    "alignment_scores",
    "amd",
    "cluster_bootstrap",
    "cluster_bootstrap_ratio",
    "denoising_strength",
    "denoising_strength_per_prompt",
    "extraction_attack",
    "extraction_interval",
    "frechet_distance",
    "frechet_distance_from_stats",
    "frechet_distance_to",
    "gaussian_stats",
    "jackknife_interval",
    "kernel_inception_distance",
    "kernel_inception_distance_to",
    "memorisation_probe",
    "memorised_captions",
    "nearest_train",
    "noise_floor",
    "novelty_floor",
    "prompt_cliques",
    "prompt_clusters",
    "seed_interval",
    "threshold_scores",
    "tiled_distance",
    "wilson_interval",
]
