"""The `t2v` command line. Importing it sets the environment the pipeline expects, before torch or
Prefect are imported; values already set by the user win."""

import os
import warnings

# Under a tight VRAM cap the caching allocator's fixed-size segments fragment: freed blocks cannot be
# reused for tensors of another size, so a plan that fits in total still runs out of memory.
# Expandable segments grow one mapping instead. Torch reads this when it first touches CUDA.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# No usage telemetry from the Prefect client. The temporary server Prefect starts when no
# PREFECT_API_URL is set ignores DO_NOT_TRACK and logs errors on hosts without internet access.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# torch imports the deprecated `pynvml` shim, which warns on every command; nothing a user can act on.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
