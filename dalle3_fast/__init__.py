"""dalle3_fast: a DALL-E 3 style text-to-image stack on fused CUDA, Triton and C++ kernels."""
__version__ = "0.1.0"
