"""Suite-wide settings. Tiny test models run fastest on one thread: OpenMP's spinning threads on a
busy 2-core machine make 32x32 matmuls 100x slower. Benchmarks keep the default thread count."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
