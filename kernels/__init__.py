"""Triton kernels of prefops, shipped in the wheel as ``prefops.kernels``.

Nothing here is imported by ``import prefops``: triton is loaded only when a fused op is
first called on a GPU tensor (or under ``TRITON_INTERPRET=1``). The torch reference of
every kernel lives in ``prefops.ops``.
"""

KERNELS = ("token_logprobs", "diffusion_dpo")
