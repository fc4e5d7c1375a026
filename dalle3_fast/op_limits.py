"""Limits of the fused ops, written once: this file is their source.

setup.py generates from it, before every build, ``csrc/op_limits.h`` (the kernels' constants,
csrc/generate_op_limits.py) and the CUDA attention instantiations, one per head dim
(csrc/cuda/instantiations/generate.py). ``dalle3_fast._C`` exports the values it was compiled
with; ``dalle3_fast.ops`` reads them from there, or from here when the extension is not built.
To change a limit: edit it here and rebuild (see csrc/README.md). Imports nothing: setup.py
reads it without importing the package.
"""

# The head dims the attention kernels are compiled for (head width = channels / heads).
SUPPORTED_HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160)

# Most keys cross-attention takes (T5 tokens).
MAX_KEY_TOKENS = 512
