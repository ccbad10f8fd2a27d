"""
Benchmark of one DPO head step: policy and reference log-prob sums, the DPO loss, the policy's
backward (dH, dW), in bf16 at GPT-2 shapes (V = 50257), for each way of computing it:

    eager     kernels/reference.py: full logits, fp32 log_softmax, gather
    compiled  torch.compile of the same function
    chunked   the reference over chunks of tokens, each chunk checkpointed (logits of one chunk alive)
    triton    kernels/logprobs.py: the fused kernel, no logits at all
    liger     Liger-Kernel's LigerFusedLinearDPOLoss (if installed)
    cce       Cut Cross-Entropy's linear_cross_entropy for policy and reference, sums in torch (if installed)

    python kernels/bench.py            # CUDA: headline shape with every method, then a sweep; CPU: tiny shapes
                                       # through the Triton interpreter, so the script cannot rot

It prints a table and writes kernels/bench_<device>.json and plots/kernel_bench_<device>.png.
Columns: median ms of the forward and of forward+backward (bwd = the difference); peak memory
above the inputs; relative error of the sequence sums against float64 (liger: of the loss); the
largest token batch that fits a memory budget, from a straight line through the peaks measured at
N and N/2; the fraction of the measured bf16 matmul rate, counting the 4 unavoidable N x V x C
matmuls (policy forward, reference forward, dH, dW) as the useful work. For the fused kernel at the
headline shape it also records the time per kernel of one fwd+bwd (torch.profiler: `triton_breakdown`).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from kernels import logprobs, reference_logprobs, sequence_logprobs  # noqa: E402

CUDA = torch.cuda.is_available()
BETA = 0.1


def chunked_logprobs(h_pol, w_pol, h_ref, w_ref, targets, mask, chunk=4096):
    """The reference over chunks of `chunk` tokens; checkpointing recomputes each chunk's logits in backward."""
    B, T, C = h_pol.shape
    safe = torch.where(mask, targets, 0).reshape(-1)

    def token_logp(h, w, t):
        return F.log_softmax((h @ w.t()).float(), -1).gather(-1, t[:, None]).squeeze(-1)

    def run(h, w, grad):
        parts = []
        for i in range(0, B * T, chunk):
            h_i, t_i = h.reshape(-1, C)[i:i + chunk], safe[i:i + chunk]
            parts.append(checkpoint(token_logp, h_i, w, t_i, use_reentrant=False) if grad else token_logp(h_i, w, t_i))
        return torch.where(mask, torch.cat(parts).view(B, T), 0.0).sum(-1)

    with torch.no_grad():
        seq_ref = run(h_ref, w_ref, False)
    return run(h_pol, w_pol, True), seq_ref


def dpo_loss(seq_pol, seq_ref):
    """Rows [0, B/2) are chosen, [B/2, B) rejected."""
    n = seq_pol.size(0) // 2
    logits = (seq_pol[:n] - seq_ref[:n]) - (seq_pol[n:] - seq_ref[n:])
    return -F.logsigmoid(BETA * logits).mean()


def make_methods():
    """name -> f(hp, wp, hr, wr, targets, mask) returning (loss, what to compare against fp64)."""
    def via(fn):
        def step(*args):
            out = fn(*args)
            seq_pol, seq_ref = (out.seq_pol, out.seq_ref) if hasattr(out, "seq_pol") else out
            return dpo_loss(seq_pol, seq_ref), torch.stack([seq_pol, seq_ref])
        return step

    methods = {
        "eager": via(reference_logprobs),
        "compiled": via(torch.compile(reference_logprobs)),
        "chunked": via(chunked_logprobs),
        "triton": via(lambda *a: sequence_logprobs(*a, impl="triton")),
    }
    if not CUDA:  # the interpreter has no compiler, and the others need CUDA
        methods.pop("compiled")
        return methods
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        liger = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=True)

        def liger_step(hp, wp, hr, wr, targets, mask):
            loss = liger(wp, hp, torch.where(mask, targets, -100), ref_input=hr, ref_weight=wr)
            loss = loss[0] if isinstance(loss, tuple) else loss
            return loss, loss[None]
        methods["liger"] = liger_step
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce_seq(h, w, targets, mask):
            nll = linear_cross_entropy(h, w, torch.where(mask, targets, -100), reduction="none")
            return -(nll.view(mask.shape) * mask).sum(-1)

        def cce_step(hp, wp, hr, wr, targets, mask):
            with torch.no_grad():
                seq_ref = cce_seq(hr, wr, targets, mask)
            seq_pol = cce_seq(hp, wp, targets, mask)
            return dpo_loss(seq_pol, seq_ref), torch.stack([seq_pol, seq_ref])
        methods["cce"] = cce_step
    except ImportError:
        pass
    return methods


def inputs(N, C, V, T, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    B = N // T
    hp, hr = (torch.randn(B, T, C, device=device, generator=g).to(dtype) for _ in range(2))
    wp, wr = ((torch.randn(V, C, device=device, generator=g) * C ** -0.5 * 4).to(dtype) for _ in range(2))
    targets = torch.randint(V, (B, T), device=device, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[:, : T // 8] = False  # a prompt that is not scored
    return hp.requires_grad_(), wp.requires_grad_(), hr, wr, targets, mask


def median_ms(fn, reps, grad_to_none=()):
    """Median time of fn in ms: CUDA events through triton's do_bench, or a wall clock on the CPU."""
    if CUDA:
        return triton.testing.do_bench(fn, warmup=reps, rep=4 * reps, grad_to_none=list(grad_to_none),
                                       return_mode="median")
    times = []
    for _ in range(reps):
        for x in grad_to_none:
            x.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_bytes(step, args):
    """Peak memory above what was allocated before the step (inputs included there), fwd + bwd."""
    hp, wp = args[:2]
    hp.grad = wp.grad = None
    if not CUDA:
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(*args)[0].backward()
    torch.cuda.synchronize()
    hp.grad = wp.grad = None
    return torch.cuda.max_memory_allocated() - base


def measure(name, step, N, C, V, T, dtype, device, exact, budget, reps):
    args = inputs(N, C, V, T, dtype, device)
    try:
        loss, compare = step(*args)
        err = ((compare.double() - exact.double()).norm() / exact.double().norm()).item() if exact is not None else None
        loss.backward()  # warm-up: compiles and autotunes
        peak = peak_bytes(step, args)
        # a second shape would make torch.compile compile again (a minute): no largest-batch figure for it
        half_peak = peak_bytes(step, inputs(N // 2, C, V, T, dtype, device)) if name != "compiled" else peak
        fwd = median_ms(lambda: step(*args), reps)
        both = median_ms(lambda: step(*args)[0].backward(), reps, grad_to_none=args[:2])
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(method=name, N=N, C=C, V=V, error="out of memory")
    except Exception as e:  # a third-party method that breaks must not hide the others' numbers
        if name == "triton":
            raise
        return dict(method=name, N=N, C=C, V=V, error=f"{type(e).__name__}: {e}"[:300])
    per_token = (peak - half_peak) / (N - N // 2)
    fits = int((budget - peak) / per_token + N) if CUDA and per_token > 0 else None
    return dict(method=name, N=N, C=C, V=V, fwd_ms=fwd, bwd_ms=both - fwd, fwd_bwd_ms=both, peak_mb=peak / 2**20,
                rel_err=err, max_tokens_in_budget=fits, tflops=8 * N * V * C / (both * 1e-3) / 1e12,
                _compare=compare.detach())  # kept for liger's error, without the graph (and the logits) behind it


def kernel_breakdown(step, args, top=8):
    """Where one fwd+bwd spends its time, per kernel (per op on a CPU): [(name, ms, calls)], largest first."""
    activity = torch.profiler.ProfilerActivity.CUDA if CUDA else torch.profiler.ProfilerActivity.CPU
    step(*args)[0].backward()  # compiled and tuned before the profile
    with torch.profiler.profile(activities=[activity]) as prof:
        step(*args)[0].backward()
        if CUDA:
            torch.cuda.synchronize()
    own = lambda e: (e.self_device_time_total if CUDA else e.self_cpu_time_total) / 1e3  # ms
    events = sorted(prof.key_averages(), key=own, reverse=True)[:top]
    return [(e.key[:90], round(own(e), 3), e.count) for e in events]


@torch.no_grad()  # only the values: the graph would hold the fp64 logits (~7 GB at the headline shape)
def fp64_sums(args):
    hp, wp, hr, wr, targets, mask = args
    out = reference_logprobs(hp.double(), wp.double(), hr.double(), wr.double(), targets, mask)
    return torch.stack([out.seq_pol, out.seq_ref])


def matmul_tflops(device):
    """The bf16 matmul rate this device reaches through torch (the roofline's ceiling)."""
    if not CUDA:
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192 ** 3 / (triton.testing.do_bench(lambda: a @ b, return_mode="median") * 1e-3) / 1e12


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--headline", default="16384,1280" if CUDA else "390,48", help="N,C for the all-methods comparison")
    p.add_argument("--sweep-tokens", default="4096,16384,65536" if CUDA else "130", help="token counts of the sweep")
    p.add_argument("--sweep-c", default="768,1280,1600" if CUDA else "40", help="hidden sizes of the sweep")
    p.add_argument("--vocab", type=int, default=50257 if CUDA else 517)
    p.add_argument("--seq-len", type=int, default=512 if CUDA else 65, help="tokens per sequence")
    p.add_argument("--budget-gb", type=float, default=40.0, help="memory budget for the largest-batch column")
    p.add_argument("--sweep-methods", default="eager,triton")
    p.add_argument("--out", default=None, help="results JSON (default kernels/bench_<device>.json)")
    p.add_argument("--fig", default=None, help="figure (default plots/kernel_bench_<device>.png)")
    args = p.parse_args()
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32  # the interpreter's bf16 tl.dot is wrong
    V, T, reps = args.vocab, args.seq_len, (25 if CUDA else 3)
    budget = args.budget_gb * 2**30
    methods = make_methods()
    peak_rate = matmul_tflops(device)
    env = dict(device=torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)", torch=torch.__version__,
               triton=triton.__version__, dtype=str(dtype), vocab=V, seq_len=T, budget_gb=args.budget_gb,
               matmul_tflops=peak_rate)
    print(" ".join(f"{k}={v}" for k, v in env.items()))

    rows = []
    N, C = map(int, args.headline.split(","))
    exact = fp64_sums(inputs(N, C, V, T, dtype, device))
    for name, step in methods.items():
        rows.append(dict(measure(name, step, N, C, V, T, dtype, device, exact if name != "liger" else None,
                                 budget, reps), part="headline"))
    env["triton_breakdown"] = kernel_breakdown(methods["triton"], inputs(N, C, V, T, dtype, device))
    print("triton fwd+bwd by kernel (ms, calls):", "; ".join(f"{n} {ms} x{k}" for n, ms, k in env["triton_breakdown"]))
    for r in rows:  # liger returns only the loss: compare it with the loss from the fp64 sums
        if r["method"] == "liger" and "_compare" in r:
            want = dpo_loss(exact[0], exact[1])
            r["rel_err"] = abs(r["_compare"].double().item() - want.item()) / abs(want.item())
    for C in map(int, args.sweep_c.split(",")):
        for N in map(int, args.sweep_tokens.split(",")):
            for name in args.sweep_methods.split(","):
                rows.append(dict(measure(name, methods[name], N, C, V, T, dtype, device, None, budget, reps),
                                 part="sweep"))

    if CUDA:  # the block sizes the autotuner picked, per (V, C, dtype), and what each candidate took
        tuned = {name: k for name, k in vars(logprobs).items() if isinstance(k, triton.runtime.Autotuner)}
        env["autotuned"] = {name: {str(key): str(cfg) for key, cfg in k.cache.items()} for name, k in tuned.items()}
        env["last_tuning_ms"] = {name: {str(cfg): t for cfg, t in getattr(k, "configs_timings", {}).items()}
                                 for name, k in tuned.items()}
    print(f"{'part':9}{'method':10}{'N':>7}{'C':>6}{'fwd ms':>9}{'bwd ms':>9}{'f+b ms':>9}{'peak MB':>10}"
          f"{'rel err':>10}{'max N':>10}{'TFLOP/s':>9}{'roofline':>9}")
    for r in rows:
        r.pop("_compare", None)
        if "error" in r:
            print(f"{r['part']:9}{r['method']:10}{r['N']:>7}{r['C']:>6}  {r['error']}")
            continue
        frac = r["tflops"] / peak_rate if peak_rate else float("nan")
        err = f"{r['rel_err']:.2e}" if r["rel_err"] is not None else "-"
        print(f"{r['part']:9}{r['method']:10}{r['N']:>7}{r['C']:>6}{r['fwd_ms']:>9.2f}{r['bwd_ms']:>9.2f}"
              f"{r['fwd_bwd_ms']:>9.2f}{r['peak_mb']:>10.0f}{err:>10}{str(r['max_tokens_in_budget']):>10}"
              f"{r['tflops']:>9.1f}{frac:>9.2f}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = args.out or os.path.join(root, "kernels", f"bench_{device}.json")
    with open(out, "w") as f:
        json.dump(dict(env=env, results=rows), f, indent=1)
    print(f"wrote {out}")
    fig = args.fig or os.path.join(root, "plots", f"kernel_bench_{device}.png")
    # a script, not an import: kernels/ imports nothing from the project outside it
    subprocess.run([sys.executable, os.path.join(root, "plots", "kernel_bench.py"), out, fig], check=True)
    print(f"wrote {fig}")


if __name__ == "__main__":
    main()
