"""The fused Triton log-prob kernel against its PyTorch specification (kernels/reference.py).

    python -m pytest tests/test_kernels.py
On a CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) in
fp32, fp16 and bf16. The interpreter's bf16 tl.dot is wrong, so there the kernels multiply fp32 copies
of the bf16 tiles: what bf16 does to dA, to the dH partials and to the GEMMs is tested on a CPU, the
tensor cores' bf16 products only on CUDA (tests marked `gpu`).
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kernels import logprobs, reference_logprobs, sequence_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative error ||x - ref|| / ||ref|| against a float64 reference, per input dtype, on CUDA
RTOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Triton's interpreter (a CPU) multiplies fp32 copies of the input tiles and sums in fp32, so its forward outputs
# (log-probs, sums, KL) are fp32-accurate in every input dtype: measured at most 8.5e-8 (log-probs and sums) and
# 1.9e-7 (KL) over SHAPES, in fp32, fp16 and bf16; fp32 gradients at most 3.7e-7 (eager fp32: 5.5e-7). The
# tolerances are within 10x of that. fp16/bf16 gradients (dA rounded to the input dtype, as on a GPU) are held
# to GRAD_VS_EAGER times the error of the eager reference on the same inputs, which computes in fp32 and rounds
# only dH and dW to the input dtype: measured 1.3-1.6x (fp16) and 1.8-2.5x (bf16) over these tests; rounding p
# to the input dtype before subtracting it from the one-hot measured 10x (fp16) and 29x (bf16).
INTERP_FWD, INTERP_GRAD_FP32, GRAD_VS_EAGER = 1e-6, 3e-6, 3.0
def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def assert_close(x, ref, rtol, what):
    diff = (x.double() - ref.double()).abs()
    err = rel_err(x, ref)
    assert err <= rtol and torch.isfinite(x).all(), \
        f"{what}: relative error {err:.3g} > {rtol:.1g} (max diff {diff.max().item():.3g}, mean {diff.mean().item():.3g})"


def make_inputs(B, T, C, V, dtype, seed=0, scale=1.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    h = lambda: (torch.randn(B, T, C, generator=g) * scale).to(dtype)
    w = lambda: (torch.randn(V, C, generator=g) / math.sqrt(C) * 4).to(dtype)  # logits of a few units
    hp, wp, hr, wr = h(), w(), h(), w()
    targets = torch.randint(V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    return [x.to(device) for x in (hp, wp, hr, wr, targets, mask)]


def run(impl, hp, wp, hr, wr, targets, mask, upstream, mode="kl"):
    """Forward (mode 'kl': with the reference and the KL; 'ref': with the reference, no KL, as DPO's training
    steps run it; 'noref': the policy alone, as SFT, SimPO and PPO's update run it), then backward of a loss that
    weights every token and every sequence."""
    hp, wp = hp.detach().requires_grad_(), wp.detach().requires_grad_()
    if mode == "noref":
        hr = wr = None
    out = sequence_logprobs(hp, wp, hr, wr, targets, mask, with_kl=mode == "kl", impl=impl)
    g_tok, g_seq = upstream
    ((out.token_pol * g_tok).sum() + (out.seq_pol * g_seq).sum()).backward()
    return out, hp.grad, wp.grad


def check_against_fp64(B, T, C, V, dtype, mask_fn=None, scale=1.0, seed=0, mode="kl"):
    hp, wp, hr, wr, targets, mask = make_inputs(B, T, C, V, dtype, seed, scale)
    if mask_fn is not None:
        mask = mask_fn(mask)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = (torch.randn(B, T, generator=g).to(DEVICE), torch.randn(B, generator=g).to(DEVICE))
    out, dh, dw = run("triton", hp, wp, hr, wr, targets, mask, upstream, mode)
    ref, rdh, rdw = run("reference", *(x.double() if x.is_floating_point() else x for x in (hp, wp, hr, wr)),
                        targets, mask, [u.double() for u in upstream], mode)
    names = {"kl": ("token_pol", "seq_pol", "token_ref", "seq_ref", "kl"), "ref": ("token_pol", "seq_pol", "token_ref",
             "seq_ref"), "noref": ("token_pol", "seq_pol")}[mode]
    assert all(getattr(out, n) is None for n in ("token_ref", "seq_ref", "kl") if n not in names)
    for name in names:
        x, r = getattr(out, name), getattr(ref, name)
        if r.abs().max() == 0:  # e.g. every token masked
            assert (x == 0).all(), name
        elif DEVICE == "cpu":
            assert_close(x, r, INTERP_FWD, name)
        else:
            assert_close(x, r, RTOL[dtype] if name != "kl" else 10 * RTOL[dtype], name)  # KL: a difference
    assert (out.token_pol[~mask] == 0).all() and (mode != "kl" or (out.kl[~mask] == 0).all())
    eager = run("reference", hp, wp, hr, wr, targets, mask, upstream, mode) if dtype != torch.float32 else None
    for k, (name, x, r) in enumerate((("dH", dh, rdh), ("dW", dw, rdw))):
        assert x.dtype == dtype
        if r.abs().max() == 0:
            assert (x == 0).all(), name
        elif DEVICE != "cpu":
            assert_close(x, r, RTOL[dtype], name)
        elif dtype == torch.float32:
            assert_close(x, r, INTERP_GRAD_FP32, name)
        else:
            assert_close(x, r, GRAD_VS_EAGER * rel_err(eager[k + 1], r), name + f" (<= {GRAD_VS_EAGER}x eager's)")


SHAPES = [(1, 37, 48, 517), (2, 65, 100, 1031), (3, 7, 20, 129)]  # odd N, V and C on purpose


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,C,V", SHAPES)
def test_matches_fp64_reference(B, T, C, V, dtype):
    check_against_fp64(B, T, C, V, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["ref", "noref"])
def test_forward_without_kl_matches_fp64_reference(mode, dtype):
    """The forward every training step runs (no KL: one model per program), against float64 in every dtype."""
    check_against_fp64(2, 65, 100, 1031, dtype, mode=mode)


def test_fully_masked_sequence_and_length_one():
    def edit(mask):
        mask = mask.clone()
        mask[0] = False  # a sequence with nothing to score
        mask[1] = False
        mask[1, 5] = True  # a response of one token
        return mask
    check_against_fp64(3, 11, 40, 300, torch.float32, mask_fn=edit)


def test_everything_masked():
    check_against_fp64(2, 5, 16, 100, torch.float32, mask_fn=torch.zeros_like)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_confident_targets_keep_their_gradient(dtype):
    """Hidden states that point at their target's embedding: p(target) from 0.5 to 1 - 2e-6. The gradient
    g (1 - p) of the target logit survives only if p is subtracted from the one-hot in fp32 (rounded to
    bf16 first, p = 0.999 becomes 1.0); then dH and dW are within GRAD_VS_EAGER of the error of the eager
    reference, whose only rounding is that of dH and dW. (bf16 dH measured 3.5e-3, eager's 1.8e-3; rounding p
    first 5.1e-2.)"""
    hp, wp, hr, wr, targets, mask = make_inputs(2, 16, 32, 300, torch.float32)
    g = torch.Generator().manual_seed(5)
    hp = wp[targets] * (torch.rand(2, 16, 1, generator=g).to(DEVICE) * 0.6 + 0.8)
    hp, wp, hr, wr = (x.to(dtype) for x in (hp, wp, hr, wr))
    upstream = (torch.randn(2, 16, generator=g).to(DEVICE), torch.randn(2, generator=g).to(DEVICE))
    _, dh, dw = run("triton", hp, wp, hr, wr, targets, mask, upstream)
    _, rdh, rdw = run("reference", *(x.double() for x in (hp, wp, hr, wr)), targets, mask, [u.double() for u in upstream])
    _, edh, edw = run("reference", hp, wp, hr, wr, targets, mask, upstream)
    for name, x, eager, exact in (("dH", dh, edh, rdh), ("dW", dw, edw, rdw)):
        assert rel_err(x, exact) <= GRAD_VS_EAGER * rel_err(eager, exact), \
            f"{name}: kernel {rel_err(x, exact):.3g} vs eager {rel_err(eager, exact):.3g}"


def test_huge_logits_do_not_overflow():
    """Logits of magnitude ~1e4: exp would overflow without the running max."""
    hp, wp, hr, wr, targets, mask = make_inputs(2, 9, 32, 257, torch.float32, scale=1.0)
    hp, hr = hp * 3000, hr * 3000  # |logits| up to ~1e4
    out = sequence_logprobs(hp, wp, hr, wr, targets, mask, with_kl=True, impl="triton")
    ref = reference_logprobs(hp.double(), wp.double(), hr.double(), wr.double(), targets, mask, with_kl=True)
    assert (ref.token_pol.abs().max() > 1000) and torch.isfinite(out.kl).all()
    assert_close(out.seq_pol, ref.seq_pol, 1e-5, "seq_pol")
    assert_close(out.seq_ref, ref.seq_ref, 1e-5, "seq_ref")


def test_without_reference():
    hp, wp, _, _, targets, mask = make_inputs(2, 9, 24, 131, torch.float32)
    out = sequence_logprobs(hp, wp, None, None, targets, mask, impl="triton")
    ref = reference_logprobs(hp.double(), wp.double(), None, None, targets, mask)
    assert out.token_ref is None and out.kl is None
    assert_close(out.seq_pol, ref.seq_pol, 1e-5, "seq_pol")


def test_gradient_from_strided_upstream():
    """seq_pol.sum() sends an expanded (stride 0) gradient; a transposed weight sends a strided one."""
    hp, wp, hr, wr, targets, mask = make_inputs(3, 8, 24, 131, torch.float32)
    g = torch.randn(8, 3).to(DEVICE).t()  # (3, 8), not contiguous
    grads = []
    for impl in ("triton", "reference"):
        h = hp.detach().requires_grad_()
        out = sequence_logprobs(h, wp, hr, wr, targets, mask, impl=impl)
        (out.seq_pol.sum() + (out.token_pol * g).sum()).backward()
        grads.append(h.grad)
    assert_close(grads[0], grads[1], 1e-5, "dH")


class RecordShapes(TorchDispatchMode):
    """Records the shape of every new tensor an op returns. In-place ops (set_, copy_, which Triton's
    interpreter uses to view and copy buffers) write into existing memory: skipped."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.overloadpacket.__name__.endswith("_"):
            self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_no_tokens_by_vocab_allocation(impl, monkeypatch):
    """Nothing with a vocabulary axis is allocated but the weights' (V, C) and their gradients. (Sizes alone
    would not do: Triton's runtime on CUDA allocates a fixed 2^26-element scratch buffer of its own.)
    The backward's scratch is one vocabulary slice of dA, at most SLICE_BYTES: here a budget that gives
    128-column slices, as 128 MiB gives 4096 columns at 16k tokens and GPT-2's vocabulary."""
    B, T, C, V = 2, 65, 48, 1031
    hp, wp, hr, wr, targets, mask = make_inputs(B, T, C, V, torch.float32)
    N = int(mask.sum())
    monkeypatch.setattr(logprobs, "SLICE_BYTES", N * 128 * 4)
    hp.requires_grad_()
    wp.requires_grad_()
    with RecordShapes() as rec:
        out = sequence_logprobs(hp, wp, hr, wr, targets, mask, with_kl=True, impl=impl)
        (out.seq_pol.sum() + out.token_pol.sum()).backward()
    with_vocab = [s for s in rec.shapes if V in s and s != (V, C)]
    if impl == "triton":
        assert with_vocab == [], f"the Triton path allocated tensors of shapes {with_vocab}"
        assert (N, 128) in rec.shapes  # the slice
        # 1-D tensors aside (per-token values, and on CUDA Triton's own fixed scratch buffer)
        largest = max(math.prod(s) for s in rec.shapes if s != (V, C) and len(s) > 1)
        assert largest <= max(N * 128, B * T * C), f"an allocation of {largest} elements"
    else:  # the reference does materialise the logits: the recorder sees them
        assert (B, T, V) in with_vocab


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_over_many_vocabulary_slices(dtype, monkeypatch):
    """Slices of 128 columns: V = 1031 gives eight full ones and a last one of 7 columns."""
    B, T = 2, 40
    N = int(make_inputs(B, T, 24, 1031, dtype)[-1].sum())
    monkeypatch.setattr(logprobs, "SLICE_BYTES", N * 128 * torch.tensor([], dtype=dtype).element_size())
    check_against_fp64(B, T, 24, 1031, dtype)


def test_every_config_compiles_for_sm90_without_spills():
    """The interpreter checks the arithmetic; this checks that Triton's GPU compiler accepts every autotuning
    configuration for an H100 in bf16 and that none spills registers (no GPU needed, only ptxas)."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "compile_check.py")
    run = subprocess.run([sys.executable, script, "bf16"], capture_output=True, text=True, timeout=600)
    rows = [line for line in run.stdout.splitlines() if line.startswith("_")]
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert len(rows) == len(logprobs.FWD_OPTIONS) + len(logprobs.GRAD_OPTIONS)


# ---------------------------------------------------------------- bad input

def test_out_of_range_target():
    hp, wp, hr, wr, targets, mask = make_inputs(2, 5, 16, 100, torch.float32)
    mask[0, 2] = True
    for bad in (100, -1):
        t = targets.clone()
        t[0, 2] = bad
        with pytest.raises(IndexError, match=rf"target id {bad} is outside the vocabulary \[0, 100\)"):
            sequence_logprobs(hp, wp, hr, wr, t, mask, impl="triton")
    t = targets.clone()
    mask[1, 1] = False
    t[1, 1] = -100  # off the mask any value is fine (ignored, never read)
    sequence_logprobs(hp, wp, hr, wr, t, mask, impl="triton")


def test_mismatched_shapes():
    hp, wp, hr, wr, targets, mask = make_inputs(2, 5, 16, 100, torch.float32)
    with pytest.raises(ValueError, match="w_pol has 15 columns but h_pol has C = 16"):
        sequence_logprobs(hp, wp[:, :15].contiguous(), hr, wr, targets, mask)
    with pytest.raises(ValueError, match="reference shapes"):
        sequence_logprobs(hp, wp, hr[:, :4], wr, targets, mask)
    with pytest.raises(ValueError, match=r"targets \(2, 4\) and mask \(2, 5\) must both be"):
        sequence_logprobs(hp, wp, hr, wr, targets[:, :4], mask)
    with pytest.raises(ValueError, match="with_kl needs the reference"):
        sequence_logprobs(hp, wp, None, None, targets, mask, with_kl=True)


def test_mixed_devices_dtypes_and_layout():
    hp, wp, hr, wr, targets, mask = make_inputs(2, 5, 16, 100, torch.float32)
    with pytest.raises(ValueError, match=r"one device.*w_ref: meta"):
        sequence_logprobs(hp, wp, hr, wr.to("meta"), targets, mask)
    with pytest.raises(TypeError, match="share one floating dtype"):
        sequence_logprobs(hp, wp.half(), hr, wr, targets, mask)
    with pytest.raises(TypeError, match="mask bool"):
        sequence_logprobs(hp, wp, hr, wr, targets, mask.int())
    with pytest.raises(ValueError, match="w_pol must be contiguous"):
        sequence_logprobs(hp, wp.t().contiguous().t(), hr, wr, targets, mask)
    with pytest.raises(ValueError, match="impl must be"):
        sequence_logprobs(hp, wp, hr, wr, targets, mask, impl="cuda")


# ---------------------------------------------------------------- CUDA (bf16 needs a real GPU)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,C,V", SHAPES)
def test_cuda_matches_fp64_reference(B, T, C, V, dtype):
    check_against_fp64(B, T, C, V, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["ref", "noref"])
def test_cuda_forward_without_kl_matches_fp64_reference(mode, dtype):
    check_against_fp64(4, 1000, 1280, 50257, dtype, mode=mode)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,C,V,dtype", [(4, 1000, 1280, 50257, torch.bfloat16), (4, 1000, 1280, 50257, torch.float32),
                                           (2, 333, 1600, 50257, torch.bfloat16)])
def test_cuda_gpt2_shapes(B, T, C, V, dtype):
    check_against_fp64(B, T, C, V, dtype)


@pytest.mark.parametrize("B,T,C,V", [(2, 65, 100, 1031), pytest.param(8, 512, 1280, 50257, marks=pytest.mark.gpu)])
def test_bf16_sums_as_accurate_as_fp32_arithmetic(B, T, C, V):
    """bf16 inputs: the eager reference multiplies them in fp32, outside autocast and in it (logits rounded to
    bf16 measured 2.1e-4 here, fp32 2.5e-8), and the kernel's sequence sums are as close to fp64 as its."""
    hp, wp, hr, wr, targets, mask = make_inputs(B, T, C, V, torch.bfloat16)
    exact = reference_logprobs(hp.double(), wp.double(), hr.double(), wr.double(), targets, mask)
    ours = sequence_logprobs(hp, wp, hr, wr, targets, mask, impl="triton")
    eager = reference_logprobs(hp, wp, hr, wr, targets, mask)
    with torch.autocast(DEVICE, torch.bfloat16):
        eager_amp = reference_logprobs(hp, wp, hr, wr, targets, mask)
    for name in ("seq_pol", "seq_ref"):
        e_ours, e_eager, e_amp = (rel_err(getattr(x, name), getattr(exact, name)) for x in (ours, eager, eager_amp))
        assert e_eager <= 1e-6 and e_amp <= 1e-6, f"{name}: eager {e_eager:.3g}, under autocast {e_amp:.3g}"
        assert e_ours <= 2 * e_eager + 1e-6, f"{name}: kernel {e_ours:.3g} vs eager {e_eager:.3g}"


@pytest.mark.gpu
def test_cuda_autocast_casts_to_bf16():
    hp, wp, hr, wr, targets, mask = make_inputs(2, 64, 96, 1031, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sequence_logprobs(hp, wp, hr, wr, targets, mask)
    ref = reference_logprobs(hp.bfloat16(), wp.bfloat16(), hr.bfloat16(), wr.bfloat16(), targets, mask)
    assert_close(out.seq_pol, ref.seq_pol, RTOL[torch.bfloat16], "seq_pol")
