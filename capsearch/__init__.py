"""capsearch: capacity search for memorisation-safe fine-tuning of text-to-image diffusion models."""

from capsearch.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
