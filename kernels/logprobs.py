"""
Fused log-probabilities of target tokens for DPO: the policy and the frozen reference in one pass,
straight from the last hidden states and the output embeddings, never materialising the logits.

Why. A DPO step needs log pi(y|x) summed over the response tokens, for the policy and for the
reference. The plain way (kernels/reference.py) writes (N, V) logits per model, N tokens and
V = 50257 for GPT-2: at N = 16384 that is 1.6 GB in bf16 per model, then 3.3 GB more for the fp32
log_softmax, then the same again for its gradient, all of it moved through DRAM several times.
Here each program keeps a tile of logits in registers, folds it into running statistics and
drops it, so DRAM sees only H (N, C), W (V, C) and a few numbers per token.

Forward, for each token i (a = policy logits h_i W^T, b = reference logits):
    lse_a = log sum_v exp(a_v)                      online: running max m and sum s, rescaled
    log p(y_i) = a_{y_i} - lse_a                    per tile as m grows
    KL_i = sum_v p_v (a_v - b_v) - lse_a + lse_b    (p = softmax(a); sum kept online like s)
Backward (policy only), with g_i the upstream gradient of log p(y_i):
    dA_iv = g_i (1[v = y_i] - exp(a_iv - lse_a))    recomputed from the saved lse_a
    dH = dA W       dW = dA^T H
The backward walks the vocabulary in slices of SLICE_BYTES / (N * element size) columns: a Triton kernel
recomputes the policy's logits for the slice and writes its dA (N x slice, in the input dtype, the
one-hot subtracted in fp32), then two ordinary matmuls (cuBLAS on a GPU) give the slice's rows of dW
and add its share of dH (kept in fp32). So one N x V x C recompute, and dH, dW as plain GEMMs; the
memory is one slice, bounded whatever N and V are, never the N x V logits or their gradient.

The kernels:
    _logprob_fwd     grid (token tiles, models); without the KL each program sweeps one model
                     (one logits tile live: big tiles); with it, one program holds both models' tiles
    _grad_logits     grid (token tiles, vocabulary tiles of one slice); writes dA for the slice
"""
import os

import torch
import triton
import triton.language as tl

from .reference import LogProbs, reference_logprobs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DOT_IN_FP32 = tl.constexpr(INTERPRET)  # the interpreter's bf16 tl.dot is wrong: it multiplies fp32 copies
SLICE_BYTES = 2 ** 27  # the backward's dA for one vocabulary slice: 128 MiB (4096 columns at N = 16384, bf16)


def _configs(options):
    """Block sizes to autotune over on a GPU; one small configuration under the interpreter."""
    if INTERPRET:
        return [triton.Config(dict(BLOCK_N=32, BLOCK_V=64, BLOCK_C=32))]
    return [triton.Config(dict(BLOCK_N=n, BLOCK_V=v, BLOCK_C=c), num_warps=w, num_stages=s) for n, v, c, w, s in options]


def _prune(configs, named_args, **kwargs):
    """Tuning pays off only at real vocabulary sizes: small problems (tests) take the first config."""
    return configs if named_args["V"] >= 8192 else configs[:1]


def _prune_fwd(configs, named_args, **kwargs):
    """Two live logits tiles (the KL) need small tiles; tests (small V) take the first that fits."""
    fits = [c for c in configs if (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"] <= 8192) == kwargs["WITH_KL"]]
    return _prune(fits, named_args)


# (BLOCK_N, BLOCK_V, BLOCK_C, warps, stages). One model per program: GEMM-like tiles. Both models (KL):
# two accumulators, so half the area. None spills registers on sm_90 in bf16 (kernels/compile_check.py).
FWD_OPTIONS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3),
               (256, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)]
GRAD_OPTIONS = [(128, 128, 64, 8, 3), (128, 128, 128, 8, 2), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
                (256, 128, 64, 8, 3), (128, 64, 64, 4, 4)]


@triton.jit
def _logits_tile(H, W, row0, col0, N, V, C,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 logits of tokens row0.. and vocabulary columns col0.., C in chunks; 0 past N, V."""
    rows = row0 + tl.arange(0, BLOCK_N)
    cols = col0 + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < N, cols < V
    h_off = rows.to(tl.int64)[:, None] * C
    w_off = cols.to(tl.int64)[None, :] * C
    a = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ks = c0 + tl.arange(0, BLOCK_C)
        k_ok = ks < C  # C need not be a multiple of BLOCK_C
        h = tl.load(H + h_off + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_C)
        w = tl.load(W + w_off + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_C, BLOCK_V)
        if DOT_IN_FP32:
            h, w = h.to(tl.float32), w.to(tl.float32)
        a = tl.dot(h, w, a, input_precision=PRECISION)
    return a


@triton.jit
def _fold(m, s, a):
    """One step of the online log-sum-exp: the running max m and sum s of exp(a - m) take in tile a."""
    m_new = tl.maximum(m, tl.max(a, 1))  # finite from the first tile on: column 0 is always real
    alpha = tl.exp(m - m_new)  # rescales what was summed under the old max
    e = tl.exp(a - m_new[:, None])
    return m_new, s * alpha + tl.sum(e, 1), alpha, e


@triton.jit
def _fwd_one(H, W, TGT, LOGP, LSE, row0, N, V, C, STORE_LSE: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    """log p(target) (and the log-sum-exp) of one model for a tile of tokens."""
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(TGT + rows, mask=row_ok, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of the logits
    s = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp(a - m)
    y = tl.zeros((BLOCK_N,), tl.float32)  # the target's logit
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        a = _logits_tile(H, W, row0, v0, N, V, C, PRECISION, BLOCK_N, BLOCK_V, BLOCK_C)
        y += tl.sum(tl.where(cols[None, :] == tgt[:, None], a, 0.0), 1)
        # columns past V (V = 50257 is odd) are -inf, so they add exp(-inf) = 0 to the sum
        m, s, _, _ = _fold(m, s, tl.where((cols < V)[None, :], a, float("-inf")))
    lse = m + tl.log(s)
    tl.store(LOGP + rows, y - lse, mask=row_ok)
    if STORE_LSE:
        tl.store(LSE + rows, lse, mask=row_ok)


@triton.jit
def _fwd_pair(HP, WP, HR, WR, TGT, LOGP_P, LOGP_R, LSE_P, KL, row0, N, V, C,
              PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    """Both models for a tile of tokens, and the exact KL, which needs both logits tiles at once."""
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(TGT + rows, mask=row_ok, other=0)
    m_p = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_p = tl.zeros((BLOCK_N,), tl.float32)
    y_p = tl.zeros((BLOCK_N,), tl.float32)
    m_r, s_r, y_r = m_p, s_p, y_p
    t_kl = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp(a - m_p) * (a - b)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = (cols < V)[None, :]
        is_tgt = cols[None, :] == tgt[:, None]
        a = _logits_tile(HP, WP, row0, v0, N, V, C, PRECISION, BLOCK_N, BLOCK_V, BLOCK_C)
        b = _logits_tile(HR, WR, row0, v0, N, V, C, PRECISION, BLOCK_N, BLOCK_V, BLOCK_C)
        y_p += tl.sum(tl.where(is_tgt, a, 0.0), 1)
        y_r += tl.sum(tl.where(is_tgt, b, 0.0), 1)
        m_p, s_p, alpha, e = _fold(m_p, s_p, tl.where(col_ok, a, float("-inf")))
        t_kl = t_kl * alpha + tl.sum(e * (a - b), 1)  # a - b = 0 past V, where both tiles are 0
        m_r, s_r, _, _ = _fold(m_r, s_r, tl.where(col_ok, b, float("-inf")))
    lse_p = m_p + tl.log(s_p)
    lse_r = m_r + tl.log(s_r)
    tl.store(LOGP_P + rows, y_p - lse_p, mask=row_ok)
    tl.store(LSE_P + rows, lse_p, mask=row_ok)
    tl.store(LOGP_R + rows, y_r - lse_r, mask=row_ok)
    tl.store(KL + rows, t_kl / s_p - lse_p + lse_r, mask=row_ok)


@triton.autotune(configs=_configs(FWD_OPTIONS), key=["V", "C", "WITH_KL"], prune_configs_by=dict(early_config_prune=_prune_fwd))
@triton.jit
def _logprob_fwd(
    HP, WP,  # policy hidden states (N, C) and output embedding (V, C), rows contiguous
    HR, WR,  # the same for the reference (program axis 1 = 1 reads them; none without a reference)
    TGT,  # (N,) int64 target ids, all in [0, V)
    LOGP_P, LOGP_R, LSE_P, KL,  # (N,) fp32 outputs
    N, V, C,
    WITH_KL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_N
    if WITH_KL:
        _fwd_pair(HP, WP, HR, WR, TGT, LOGP_P, LOGP_R, LSE_P, KL, row0, N, V, C, PRECISION, BLOCK_N, BLOCK_V, BLOCK_C)
    else:
        if tl.program_id(1) == 0:
            _fwd_one(HP, WP, TGT, LOGP_P, LSE_P, row0, N, V, C, True, PRECISION, BLOCK_N, BLOCK_V, BLOCK_C)
        else:
            _fwd_one(HR, WR, TGT, LOGP_R, LSE_P, row0, N, V, C, False, PRECISION, BLOCK_N, BLOCK_V, BLOCK_C)


@triton.autotune(configs=_configs(GRAD_OPTIONS), key=["V", "C"], prune_configs_by=dict(early_config_prune=_prune))
@triton.jit
def _grad_logits(
    H, W,  # policy hidden states (N, C) and output embedding (V, C)
    TGT, LSE, G,  # (N,) target ids, saved log-sum-exp, upstream gradient of log p
    DA,  # (N, S) slice of dA for vocabulary columns [V0, V0 + S), row stride DA_STRIDE
    N, V, C, V0, S, DA_STRIDE,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row0, j0 = tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_V
    rows = row0 + tl.arange(0, BLOCK_N)
    j = j0 + tl.arange(0, BLOCK_V)  # columns within the slice; the vocabulary ids are V0 + j
    row_ok, col_ok = rows < N, j < S
    a = _logits_tile(H, W, row0, V0 + j0, N, V, C, PRECISION, BLOCK_N, BLOCK_V, BLOCK_C)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    # subtract the one-hot in fp32: rounding p to bf16 first would lose the gradient of a confident target
    da = g[:, None] * (tl.where(V0 + j[None, :] == tgt[:, None], 1.0, 0.0) - tl.exp(a - lse[:, None]))
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(DA + rows.to(tl.int64)[:, None] * DA_STRIDE + j[None, :], da.to(DA.dtype.element_ty), mask=ok)


def _precision(dtype):
    # fp32 tl.dot would use TF32 on a GPU by default; fp32 inputs ask for fp32 accuracy
    return "ieee" if dtype == torch.float32 else "tf32"


class FusedLogProbs(torch.autograd.Function):
    """Per-token log p(target) of the policy (differentiable) and the reference, and the exact KL.
    Inputs are flat: h (N, C), w (V, C), targets (N,) in [0, V); h_ref / w_ref may be None."""

    @staticmethod
    def forward(ctx, h_pol, w_pol, h_ref, w_ref, targets, with_kl):
        N, C = h_pol.shape
        V = w_pol.shape[0]
        has_ref = h_ref is not None
        logp_pol, logp_ref, lse, kl = (torch.empty(N, device=h_pol.device, dtype=torch.float32) for _ in range(4))
        if N > 0:
            models = 2 if has_ref and not with_kl else 1
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), models)
            _logprob_fwd[grid](h_pol, w_pol, h_ref if has_ref else h_pol, w_ref if has_ref else w_pol, targets,
                               logp_pol, logp_ref, lse, kl, N, V, C, WITH_KL=with_kl, PRECISION=_precision(h_pol.dtype))
        ctx.save_for_backward(h_pol, w_pol, targets, lse)
        ctx.mark_non_differentiable(logp_ref, kl)
        return logp_pol, logp_ref, kl

    @staticmethod
    def backward(ctx, g, _g_ref, _g_kl):
        h, w, targets, lse = ctx.saved_tensors
        (N, C), V = h.shape, w.shape[0]
        need_h, need_w = ctx.needs_input_grad[:2]
        dh = torch.zeros(N, C, device=h.device, dtype=torch.float32) if need_h else None  # a sum over slices
        dw = torch.zeros_like(w) if need_w else None  # each slice writes its own rows
        if N > 0:
            g = g.float().contiguous()  # an upstream gradient may arrive strided (e.g. from an expand)
            width = min(V, max(128, SLICE_BYTES // (N * h.element_size()) // 128 * 128))  # columns per slice
            da = torch.empty(N, width, device=h.device, dtype=h.dtype)
            for v0 in range(0, V, width):
                S = min(width, V - v0)
                _grad_logits[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(S, meta["BLOCK_V"]))](
                    h, w, targets, lse, g, da, N, V, C, v0, S, width, PRECISION=_precision(h.dtype))
                da_s = da[:, :S]  # (N, S)
                if need_w:  # these rows of dW are complete: the GEMM sums over all N tokens in fp32
                    torch.mm(da_s.t(), h, out=dw[v0:v0 + S])
                if need_h:  # one slice's share of dH, rounded to the input dtype, added in fp32
                    dh += da_s @ w[v0:v0 + S]
        return (dh.to(h.dtype) if need_h else None), dw, None, None, None, None


def sequence_logprobs(h_pol, w_pol, h_ref, w_ref, targets, mask, with_kl=False, impl="auto"):
    """Log-probabilities of the target tokens under the policy and the frozen reference.

    h_pol, h_ref: (B, T, C) last hidden states (after ln_f); h_ref, w_ref may be None (no reference)
    w_pol, w_ref: (V, C) output embeddings (lm_head.weight)
    targets:      (B, T) integer ids of the next token; only read where mask is True
    mask:         (B, T) bool, True on the tokens to score (the response), False on prompt and padding
    with_kl:      also return the exact per-token KL(pi_pol || pi_ref) over the whole vocabulary
    impl:         'auto' (Triton on CUDA, the reference elsewhere), 'triton' or 'reference'
    Returns LogProbs(token_pol, seq_pol, token_ref, seq_ref, kl): per-token values (B, T), zero off the
    mask, and per-sequence sums (B,). Gradients reach h_pol and w_pol only; the reference and the KL
    carry none. Under CUDA autocast the inputs are cast to the autocast dtype (bf16).
    """
    has_ref = h_ref is not None
    if has_ref != (w_ref is not None):
        raise ValueError("h_ref and w_ref must be given together (or both None)")
    _check(h_pol, w_pol, h_ref, w_ref, targets, mask, with_kl)
    if impl == "auto":
        impl = "triton" if h_pol.is_cuda else "reference"
    if impl not in ("triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "triton" and not (h_pol.is_cuda or INTERPRET):
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing kernels)")
    if torch.is_autocast_enabled(h_pol.device.type):  # the lm_head matmul runs in the autocast dtype
        dt = torch.get_autocast_dtype(h_pol.device.type)
        h_pol, w_pol = h_pol.to(dt), w_pol.to(dt)
        if has_ref:
            h_ref, w_ref = h_ref.to(dt), w_ref.to(dt)
    if impl == "reference":
        return reference_logprobs(h_pol, w_pol, h_ref, w_ref, targets, mask, with_kl)

    # score only the masked tokens: prompt and padding rows never reach the kernel
    B, T, C = h_pol.shape
    idx = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions of the scored tokens
    flat = lambda x: None if x is None else x.reshape(B * T, C)[idx]
    lp, lq, kl = FusedLogProbs.apply(flat(h_pol), w_pol, flat(h_ref), w_ref, targets.reshape(-1)[idx], with_kl)
    scatter = lambda x: torch.zeros(B * T, device=x.device, dtype=x.dtype).index_copy(0, idx, x).view(B, T)
    token_pol = scatter(lp)
    token_ref = scatter(lq) if has_ref else None
    return LogProbs(token_pol, token_pol.sum(-1), token_ref, token_ref.sum(-1) if has_ref else None,
                    scatter(kl) if with_kl else None)


def _check(h_pol, w_pol, h_ref, w_ref, targets, mask, with_kl):
    """Clear errors for bad input, before any kernel could read out of bounds."""
    if h_pol.dim() != 3 or w_pol.dim() != 2:
        raise ValueError(f"expected h_pol (B, T, C) and w_pol (V, C), got {tuple(h_pol.shape)} and {tuple(w_pol.shape)}")
    B, T, C = h_pol.shape
    V = w_pol.shape[0]
    if w_pol.shape[1] != C:
        raise ValueError(f"w_pol has {w_pol.shape[1]} columns but h_pol has C = {C}")
    if h_ref is not None and (h_ref.shape != h_pol.shape or w_ref.shape != w_pol.shape):
        raise ValueError(f"reference shapes {tuple(h_ref.shape)}, {tuple(w_ref.shape)} differ from the "
                         f"policy's {tuple(h_pol.shape)}, {tuple(w_pol.shape)}")
    if targets.shape != (B, T) or mask.shape != (B, T):
        raise ValueError(f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must both be (B, T) = {(B, T)}")
    if with_kl and h_ref is None:
        raise ValueError("with_kl needs the reference (h_ref, w_ref)")
    tensors = dict(h_pol=h_pol, w_pol=w_pol, h_ref=h_ref, w_ref=w_ref, targets=targets, mask=mask)
    devices = {f"{k}: {v.device}" for k, v in tensors.items() if v is not None}
    if len({v.device for v in tensors.values() if v is not None}) > 1:
        raise ValueError(f"all inputs must be on one device, got {', '.join(sorted(devices))}")
    floats = {k: v.dtype for k, v in tensors.items() if k[0] in "hw" and v is not None}
    if len(set(floats.values())) > 1 or not all(d.is_floating_point for d in floats.values()):
        raise TypeError(f"h and w must share one floating dtype, got {floats}")
    if targets.dtype not in (torch.int32, torch.int64) or mask.dtype != torch.bool:
        raise TypeError(f"targets must be int32/int64 and mask bool, got {targets.dtype} and {mask.dtype}")
    for k in ("w_pol", "w_ref"):
        if tensors[k] is not None and not tensors[k].is_contiguous():
            raise ValueError(f"{k} must be contiguous (its strides are {tensors[k].stride()}); call .contiguous()")
    scored = targets[mask]
    if scored.numel() and (scored.min() < 0 or scored.max() >= V):  # one sync; an out-of-range id would read out of bounds
        bad = scored[(scored < 0) | (scored >= V)][0].item()
        raise IndexError(f"target id {bad} is outside the vocabulary [0, {V})")
