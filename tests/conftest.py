"""Test-wide settings: the tiny models here run fastest on one intra-op thread, and a
fixed thread count keeps float results reproducible across machines."""

import torch

torch.set_num_threads(1)
