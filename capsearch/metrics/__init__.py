"""Evaluation metrics (FID, KID, AMD, extraction, denoising strength, alignment, membership) and intervals."""

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
    extraction_interval,
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
    jackknife_interval,
    prompt_clusters,
    seed_interval,
    two_sample_bootstrap,
    wilson_interval,
)
from capsearch.metrics.kid import kernel_inception_distance, kernel_inception_distance_to
from capsearch.metrics.membership import membership_auc_of, membership_losses
from capsearch.metrics.memorisation import memorisation_probe, memorised_captions
from capsearch.metrics.reference import noise_floor

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
    "membership_auc_of",
    "membership_losses",
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
    "two_sample_bootstrap",
    "wilson_interval",
]
