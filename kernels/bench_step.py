"""
Benchmark of a whole DPO training step (policy + frozen reference forward, the loss, backward,
RMSprop step) at GPT-2 small and large shapes, through the fused kernel and through the PyTorch
reference path, in bf16 autocast; and of sampling with generate(). Random weights and tokens: speed
and memory do not depend on them.

    python kernels/bench_step.py     # CUDA only; writes kernels/bench_step_cuda.json

Its throughputs are what the README's projection of the full IMDb run is computed from.
"""
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dpo  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def step_time(model_name, impl, pairs=64, prompt=8, response=65, reps=8):
    cfg = GPTConfig(**GPT.SIZES[model_name])
    torch.manual_seed(0)
    policy = GPT(cfg).cuda()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    args = dpo.get_args(["--preset", "imdb", "--device", "cuda", "--impl", impl])
    opt = torch.optim.RMSprop(policy.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, cfg.vocab_size - 1, (n,), generator=g).tolist()
    batch = [x.cuda() for x in dpo.pack([ids(prompt)] * 2 * pairs, [ids(response - 1) + [50256] for _ in range(2 * pairs)],
                                        cfg.block_size)]
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(reps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = dpo.pair_loss(policy, batch, args, ref, "dpo", 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:  # the first steps compile and autotune
            times.append(time.perf_counter() - t0)
    ms = sorted(times)[len(times) // 2] * 1e3
    tokens = batch[0].numel()
    return dict(model=model_name, impl=impl, pairs=pairs, tokens=tokens, step_ms=ms, tokens_per_s=tokens / ms * 1e3,
                peak_gb=torch.cuda.max_memory_allocated() / 2**30)


def sample_rate(model_name, batch=256, prompt=8, new=64):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT.SIZES[model_name])).cuda().eval()
    idx = torch.randint(0, 50256, (batch, prompt), device="cuda")
    mask = torch.ones_like(idx, dtype=torch.bool)
    for i in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            model.generate(idx, mask, new, temperature=1.0)  # no EOS: every row runs the full length
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dict(model=model_name, batch=batch, new_tokens=new, seconds=dt, samples_per_s=batch / dt)


def main():
    rows = [step_time(m, impl) for m in ("gpt2", "gpt2-large") for impl in ("triton", "reference")]
    gen = [sample_rate(m) for m in ("gpt2", "gpt2-large")]
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'model':12}{'impl':11}{'tokens':>8}{'step ms':>9}{'tok/s':>10}{'peak GB':>9}")
    for r in rows:
        print(f"{r['model']:12}{r['impl']:11}{r['tokens']:>8}{r['step_ms']:>9.1f}{r['tokens_per_s']:>10,.0f}{r['peak_gb']:>9.1f}")
    for r in gen:
        print(f"generate {r['model']}: {r['batch']} samples x {r['new_tokens']} tokens in {r['seconds']:.2f}s "
              f"= {r['samples_per_s']:.0f} samples/s")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_step_cuda.json")
    with open(out + ".tmp", "w") as f:
        json.dump(dict(env=env, steps=rows, generate=gen), f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
