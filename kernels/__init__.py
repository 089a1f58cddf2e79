"""Triton kernels (installed as fastdume.kernels). Tensors in, tensors out: nothing here knows
about models, configs or files. Call them through fastdume.ops."""
