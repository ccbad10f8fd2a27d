"""
Benchmark of a whole DPO training step (policy + frozen reference forward, the loss, backward,
RMSprop step), of a PPO minibatch update (policy + value head, the clipped losses, backward, step) and of
RLOO's and GRPO's (policy only: no value head, the rollout's reference log-probs are inputs) at GPT-2 small
and large shapes, through the fused kernel and through the PyTorch reference path, in
bf16 autocast; and of sampling with generate() (PPO's rollouts are mostly sampling). Random weights
and tokens: speed and memory do not depend on them.

    python bench_step.py     # CUDA: writes results/bench_step_cuda.json
                             # CPU: a tiny model through the Triton interpreter, so the script cannot rot

Its throughputs are what the README's projection of the full IMDb run is computed from.
"""
import argparse
import copy
import json
import os
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (through common and kernels)
from common import amp, pack  # noqa: E402
from data.corpus import write_atomic  # noqa: E402
from dpo import pair_loss  # noqa: E402
from ppo import Rollout, critic_free_loss, ppo_loss  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
SHAPES = dict(GPT.SIZES, tiny=dict(n_layer=1, n_head=2, n_embd=32, vocab_size=257, block_size=128))


def sync():
    if CUDA:
        torch.cuda.synchronize()


def step_time(model_name, impl, pairs, algo="dpo", prompt=8, response=65, reps=8):
    """One optimizer step on 2 * pairs sequences: DPO's (policy and reference forward, loss, backward), a PPO
    minibatch update (policy forward with its value head, the clipped losses, backward; no reference), or an
    RLOO or GRPO one (policy forward, the clipped surrogate, GRPO's KL term; no value head, no reference)."""
    cfg = GPTConfig(**SHAPES[model_name], score_head=algo == "ppo")
    torch.manual_seed(0)
    # initialised where it runs: gpt2-large's init takes 7-17 s on a CPU, each time
    with torch.device(DEVICE):
        policy = GPT(cfg)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.RMSprop(policy.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, cfg.vocab_size - 1, (n,), generator=g).tolist()
    eos = cfg.vocab_size - 1
    batch = [x.to(DEVICE) for x in pack([ids(prompt)] * 2 * pairs, [ids(response - 1) + [eos] for _ in range(2 * pairs)],
                                        cfg.block_size, eos)]
    noise = lambda scale: torch.randn(batch[0].shape, device=DEVICE) * scale
    if algo == "ppo":  # a rollout: old log-probs (negative) and values, advantages, returns
        old_logp, values, adv, returns = noise(0.1) - 3.0, noise(0.1), noise(1.0), noise(1.0)
        batch = Rollout(*batch, old_logp, None, values, adv, returns)
    if algo in ("rloo", "grpo"):  # old and reference log-probs, one advantage per sequence
        old_logp, ref_logp = noise(0.1) - 3.0, noise(0.1) - 3.0
        batch = Rollout(*batch, old_logp, ref_logp, None, torch.randn(batch[0].size(0), device=DEVICE), None)
    loss_fn = {"dpo": lambda: pair_loss(policy, batch, ref, "dpo", 0.1, impl),
               "ppo": lambda: ppo_loss(policy, batch, impl),
               "rloo": lambda: critic_free_loss(policy, batch, "rloo", 0.05, impl),
               "grpo": lambda: critic_free_loss(policy, batch, "grpo", 0.05, impl)}[algo]
    times = []
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    for i in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        with amp(DEVICE):
            loss, _ = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= 2:  # the first steps compile and autotune
            times.append(time.perf_counter() - t0)
    ms = sorted(times)[len(times) // 2] * 1e3
    tokens = batch[0].numel()
    return dict(model=model_name, algo=algo, impl=impl, sequences=2 * pairs, tokens=tokens, step_ms=ms,
                tokens_per_s=tokens / ms * 1e3,
                peak_gb=torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan"))


def sample_rate(model_name, batch, prompt=8, new=64):
    cfg = GPTConfig(**SHAPES[model_name])
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size - 1, (batch, prompt), device=DEVICE)
    mask = torch.ones_like(idx, dtype=torch.bool)
    for i in range(2):  # the second run is timed
        sync()
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16, enabled=CUDA):
            model.generate(idx, mask, new, temperature=1.0)  # no EOS: every row runs the full length
        sync()
    dt = time.perf_counter() - t0
    return dict(model=model_name, batch=batch, new_tokens=new, seconds=dt, samples_per_s=batch / dt)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 f"bench_step_{DEVICE}.json"))
    out = p.parse_args().out
    models, pairs, reps, gen = (("gpt2", "gpt2-large"), 64, 8, 256) if CUDA else (("tiny",), 2, 1, 4)
    rows = [step_time(m, impl, pairs, algo, reps=reps) for algo in ("dpo", "ppo", "rloo", "grpo") for m in models
            for impl in ("triton", "reference")]
    gens = [sample_rate(m, gen) for m in models]
    env = dict(device=torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)", torch=torch.__version__,
               triton=__import__("triton").__version__)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'step':6}{'model':12}{'impl':11}{'tokens':>8}{'step ms':>9}{'tok/s':>10}{'peak GB':>9}")
    for r in rows:
        print(f"{r['algo']:6}{r['model']:12}{r['impl']:11}{r['tokens']:>8}{r['step_ms']:>9.1f}{r['tokens_per_s']:>10,.0f}"
              f"{r['peak_gb']:>9.1f}")
    for r in gens:
        print(f"generate {r['model']}: {r['batch']} samples x {r['new_tokens']} tokens in {r['seconds']:.2f}s "
              f"= {r['samples_per_s']:.0f} samples/s")
    write_atomic(out, lambda f: f.write(json.dumps(dict(env=env, steps=rows, generate=gens), indent=1).encode()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
