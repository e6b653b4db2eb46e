"""t2v: nightly text-to-video batches with Wan2.2 TI2V-5B on small GPUs."""

import os

# Set before PyTorch first touches the GPU (it reads this once). Expandable segments keep reserved memory
# near allocated while weights stream in and out under a cap. The offloaded weights (up to 24 GB at full
# size) are pinned at load: on an H100 host 2 GiB took 1.1-3.3 s through cudaHostAlloc and 0.3-0.4 s
# through the host-register path on 8 threads (docs/benchmarks.md). A value the user set wins.
os.environ.setdefault(
    "PYTORCH_CUDA_ALLOC_CONF",
    "expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:8",
)
