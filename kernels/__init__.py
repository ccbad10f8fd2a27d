"""The fused log-prob kernel (logprobs.py) and its plain PyTorch specification (reference.py)."""
from .logprobs import sequence_logprobs
from .reference import LogProbs, reference_logprobs

__all__ = ["sequence_logprobs", "reference_logprobs", "LogProbs"]
