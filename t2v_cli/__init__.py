"""The `t2v` command line. Importing it sets the environment the pipeline expects, before torch or
Prefect are imported; values already set by the user win."""

import os
import warnings

# `import t2v` sets PYTORCH_CUDA_ALLOC_CONF (expandable segments, pinning through cudaHostRegister) unless
# the user set it. That one definition serves the library, the benchmarks and the CLI alike; setting a
# value here would run first and silently drop the pinned-memory options.
import t2v  # noqa: F401

# No usage telemetry from the Prefect client. The temporary server Prefect starts when no
# PREFECT_API_URL is set ignores DO_NOT_TRACK and logs errors on hosts without internet access.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# torch imports the deprecated `pynvml` shim, which warns on every command; nothing a user can act on.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
