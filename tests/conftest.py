"""Test-wide settings: the tiny models here run fastest on one intra-op thread, and a
fixed thread count keeps float results reproducible across machines."""

import torch

torch.set_num_threads(1)

# Nothing in the tests may reach the network: `datasets` / huggingface_hub read these when
# first imported (every import of them here is lazy, after this file), and a cache of our own
# keeps the user's ~/.cache untouched.
import os  # noqa: E402
import tempfile  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="kdcache-test-hf-"))
