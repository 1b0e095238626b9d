"""Triton kernels (maths only, no policy). Installed as ``simnpo_fast.kernels``."""
