"""t2v: nightly text-to-video batches with Wan2.2 TI2V-5B on small GPUs."""

import os

# Set before PyTorch first touches the GPU (it reads this once). Expandable segments keep reserved memory
# near allocated while weights stream in and out under a cap. Pinning the offloaded weights (24 GB at
# full size) through cudaHostAlloc ran at ~1 GB/s, 23 s of a night's start (docs/benchmarks.md); the
# host-register path maps the pages on 8 threads first. A value the user set wins.
os.environ.setdefault(
    "PYTORCH_CUDA_ALLOC_CONF",
    "expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:8",
)
