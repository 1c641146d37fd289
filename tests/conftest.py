"""Test-wide settings: one torch thread (tiny models; avoids oversubscription when processes share 2 cores)."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)
