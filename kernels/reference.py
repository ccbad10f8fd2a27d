"""
The specification of what kernels/logprobs.py computes, in plain PyTorch.

It materialises the (B, T, V) logits, which is exactly what the fused kernel exists to avoid,
but it is short enough to check by eye, and every Triton result is tested against it.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class LogProbs(NamedTuple):
    token_pol: torch.Tensor  # (B, T) log pi_theta(y_t | ...) on response tokens, 0 elsewhere
    seq_pol: torch.Tensor  # (B,) sum of token_pol over each sequence
    token_ref: Optional[torch.Tensor]  # (B, T) the same for the frozen reference (no gradient)
    seq_ref: Optional[torch.Tensor]  # (B,)
    kl: Optional[torch.Tensor]  # (B, T) exact KL(pi_theta || pi_ref) over the whole vocabulary, 0 off the mask


def reference_logprobs(h_pol, w_pol, h_ref, w_ref, targets, mask, with_kl=False):
    """h (B, T, C) hidden states, w (V, C) output embedding, targets (B, T) ids, mask (B, T) bool.
    logits in fp32 -> log_softmax -> gather the target -> zero off the mask -> sum per sequence.
    bf16 or fp16 inputs are multiplied in fp32 (with autocast off), as the kernel accumulates their products:
    logits rounded to bf16 (a step of 0.25 at GPT-2's -60) would cost the sums 2-3 decimal digits."""
    safe = torch.where(mask, targets, 0)[..., None]  # masked targets may be anything (padding, -100)

    def logp_all(h, w):  # (B, T, V) log-probabilities in fp32 (fp64 for fp64 inputs)
        dt = torch.promote_types(h.dtype, torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            return F.log_softmax(h.to(dt) @ w.to(dt).t(), dim=-1)

    lp = logp_all(h_pol, w_pol)
    token_pol = torch.where(mask, lp.gather(-1, safe).squeeze(-1), 0.0)
    token_ref = seq_ref = kl = None
    if h_ref is not None:
        with torch.no_grad():
            lq = logp_all(h_ref, w_ref)
            token_ref = torch.where(mask, lq.gather(-1, safe).squeeze(-1), 0.0)
            seq_ref = token_ref.sum(-1)
            if with_kl:  # KL(p || q) = sum_v p_v (log p_v - log q_v)
                kl = torch.where(mask, (lp.exp() * (lp - lq)).sum(-1), 0.0)
    return LogProbs(token_pol, token_pol.sum(-1), token_ref, seq_ref, kl)
