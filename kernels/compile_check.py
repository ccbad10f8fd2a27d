"""
Compile every autotuning configuration of the kernels for an H100 (sm_90a) on a machine without a GPU,
and report what ptxas says: registers per thread, bytes spilled, shared memory, whether the C loop is
software-pipelined (async copies) and uses wgmma. The interpreter runs the kernels' arithmetic on a
CPU; this checks the other half, that the GPU compiler accepts them and that no tile spills.

    python kernels/compile_check.py            # bf16 (what training runs); exits 1 on a failure or a spill
    python kernels/compile_check.py fp16 fp32  # fp32 asks for IEEE dots: no wgmma, spills expected

Integer arguments that are multiples of 16 (C, the slice's start and stride) and all pointers are
compiled as 16-divisible, as Triton's launcher specialises them at run time for GPT-2 shapes; without
that hint the loads are not pipelined. Needs Triton's NVIDIA backend (its bundled ptxas), not a GPU.
"""
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # a real compile, not the interpreter
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import compiler as nvidia  # noqa: E402

from kernels import logprobs as L  # noqa: E402

DIVISIBLE = {"C", "V0", "DA_STRIDE"}


def ptxas_path():
    """Triton's own ptxas for sm_90 (the helper's signature has changed across Triton versions)."""
    try:
        tool = nvidia.get_ptxas(90)
    except TypeError:
        tool = nvidia.get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]


def compile_one(kernel, types, constants, warps, stages):
    """Compile for sm_90a; returns (registers, spilled bytes, shared bytes, async copies, wgmma ops)."""
    fn = kernel.fn  # under the autotuner
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in types.items() if t[0] == "*" or a in DIVISIBLE}
    signature = {**types, **{k: "constexpr" for k in constants}}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        log = subprocess.run([ptxas_path(), "-arch=sm_90a", "-v", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    ttgir = k.asm["ttgir"]
    return regs, spill, k.metadata.shared, ttgir.count("async_copy_global_to_local"), ttgir.count("warp_group_dot ")


def main(dtypes):
    failed = False
    print(f"triton {triton.__version__}, sm_90a")
    print(f"{'kernel':14s} {'dtype':5s} {'mode':6s} {'tile N x V x C':>15s} {'w':>2s} {'s':>2s} {'regs':>5s} "
          f"{'spill':>6s} {'smem KB':>8s} {'async':>6s} {'wgmma':>6s}")
    for dt in dtypes:
        p = f"*{dt}"
        precision = "ieee" if dt == "fp32" else "tf32"
        fwd = dict(HP=p, WP=p, HR=p, WR=p, TGT="*i64", LOGP_P="*fp32", LOGP_R="*fp32", LSE_P="*fp32", KL="*fp32",
                   N="i32", V="i32", C="i32")
        grad = dict(H=p, W=p, TGT="*i64", LSE="*fp32", G="*fp32", DA=p, N="i32", V="i32", C="i32", V0="i32", S="i32",
                    DA_STRIDE="i32")
        # the configurations the autotuners choose from, split by mode as the forward's pruning splits them
        big_v = dict(V=50257)
        jobs = [(L._logprob_fwd, fwd, dict(WITH_KL=kl), cfg, "kl" if kl else "no kl")
                for kl in (False, True) for cfg in L._prune_fwd(L._logprob_fwd.configs, big_v, WITH_KL=kl)]
        jobs += [(L._grad_logits, grad, {}, cfg, "") for cfg in L._prune(L._grad_logits.configs, big_v)]
        for kernel, types, extra, cfg, mode in jobs:
            (bn, bv, bc), w, s = (cfg.kwargs[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_C")), cfg.num_warps, cfg.num_stages
            constants = dict(extra, PRECISION=precision, **cfg.kwargs)
            name = kernel.fn.__name__
            try:
                regs, spill, smem, n_async, n_wgmma = compile_one(kernel, types, constants, w, s)
            except Exception as e:  # report every configuration, then fail
                print(f"{name:14s} {dt:5s} {mode:6s} {bn:>4d}x{bv:>4d}x{bc:>3d}  FAILED: {str(e).splitlines()[0][:200]}")
                failed = True
                continue
            print(f"{name:14s} {dt:5s} {mode:6s} {bn:>4d}x{bv:>4d}x{bc:>3d} {w:>3d} {s:>2d} {regs:>5d} {spill:>6d} "
                  f"{smem / 1024:>8.0f} {n_async:>6d} {n_wgmma:>6d}")
            failed |= dt != "fp32" and spill > 0
    return failed


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:] or ["bf16"]) else 0)
