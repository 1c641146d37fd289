"""Evaluation metrics: FID, AMD, extraction attack, denoising strength and image-text alignment."""

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
from capsearch.metrics.fid import frechet_distance, frechet_distance_from_stats, gaussian_stats
from capsearch.metrics.memorisation import memorisation_probe, memorised_captions

__all__ = [
    "PHANTOM_THRESHOLD",
    "ExtractionResult",
    "ImageTextScorer",
    "alignment_score",
    "alignment_scores",
    "amd",
    "denoising_strength",
    "denoising_strength_per_prompt",
    "extraction_attack",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "memorisation_probe",
    "memorised_captions",
    "nearest_train",
    "novelty_floor",
    "prompt_cliques",
    "threshold_scores",
    "tiled_distance",
]
