"""Memorisation mitigations applied inside the training loop, one file each, registered by a decorator.

A mitigation is a config dataclass and a hook for the stage of a training step it acts on
(capsearch.training.mitigations.base): the captions, the text embeddings, or the loss. A run's list
`[{"name": ..., **params}, ...]` is parsed once, by its settings (TrainSettings validates it and
`mitigation_stack` hands the loop the parsed configs); the loop applies them stage by stage (`Mitigations`).

Several mitigations stack, each at most once. Caption-stage ones apply in a fixed order whatever the
order of the list: fixed RWA (before training), then replacement, per-draw RWA and dropout last, so an
augmented caption can still be dropped and dropout keeps its probability p. GNI then perturbs the
embeddings of the captions that were not dropped, and threshold mitigation filters the batch's loss.
Caption dropout also has a shorthand, the `train.caption_dropout` field, which every run applies first.
"""

from capsearch.training.mitigations.base import (
    CAPTION,
    EMBEDDING,
    LOSS,
    STAGES,
    Mitigation,
    MitigationConfig,
    get_mitigation,
    make_config,
    mitigation_names,
    mitigation_params,
    parse_mitigations,
    register_mitigation,
    shorthand_fields,
    shorthand_mitigations,
    train_mitigations,
)
from capsearch.training.mitigations.stack import CaptionDraw, Mitigations, vocabulary_words

__all__ = [
    "CAPTION",
    "EMBEDDING",
    "LOSS",
    "STAGES",
    "CaptionDraw",
    "Mitigation",
    "MitigationConfig",
    "Mitigations",
    "get_mitigation",
    "make_config",
    "mitigation_names",
    "mitigation_params",
    "parse_mitigations",
    "register_mitigation",
    "shorthand_fields",
    "shorthand_mitigations",
    "train_mitigations",
    "vocabulary_words",
]

# One import line per mitigation file: registration happens on import, in this order (the order
# unknown-name errors list them in).
# isort: off
from capsearch.training.mitigations import rwa as _rwa  # noqa: F401
from capsearch.training.mitigations import threshold as _threshold  # noqa: F401
from capsearch.training.mitigations import gni as _gni  # noqa: F401
from capsearch.training.mitigations import caption_replace as _caption_replace  # noqa: F401
from capsearch.training.mitigations import caption_dropout as _caption_dropout  # noqa: F401
# isort: on
