"""Functional ops on torch tensors. Importing this module imports torch, never triton."""

from prefops.ops.token_logprobs import TokenLogprobs, token_logprobs

__all__ = ["TokenLogprobs", "token_logprobs"]
