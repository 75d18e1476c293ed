"""Shared test setup: make the helpers in this folder importable and keep runs deterministic."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.manual_seed(0)
