"""
nanoDPO: Direct Preference Optimization (Rafailov et al., 2023), read top to bottom.

    python dpo.py                  # the imdb preset on a GPU, the tiny one on a CPU (said on the first line)
    python dpo.py --preset tiny    # synthetic reviews, a small GPT from scratch, minutes on a CPU
    torchrun --nproc_per_node=8 dpo.py --preset imdb

The controlled sentiment experiment of the paper (Sec. 6.1, App. C.1), as one pipeline:
  1. data        labelled movie reviews (data/<preset>/)
  2. SFT         the reference policy pi_ref: a language model fine-tuned on the reviews     (stages.py)
  3. reward      the ground truth r*(x, y): a sentiment classifier, p(positive), on the labels (stages.py)
  4. pairs       4 samples of pi_ref per prompt, all 6 pairs, the higher reward is chosen    (stages.py)
  5. DPO         a policy trained on the pairs from pi_ref, for each beta; baselines with the same loop
  6. evaluate    every K steps: mean reward of policy samples, and KL(pi || pi_ref) over them
  7. figure      reward against KL: plots/frontier.py
One training loop (train) serves SFT, the classifier and every DPO run. Every stage writes under
out/<preset>/ and a rerun skips what is complete.
"""
import argparse
import copy
import json
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from data.corpus import load_checkpoint, load_corpus, save_checkpoint, write_atomic
from kernels import sequence_logprobs
from model import GPT, GPTConfig, get_tokenizer, left_pad

# ----------------------------------------------------------------------------- 0. settings
PRESETS = {
    "tiny": dict(data="tiny", init="scratch", n_layer=4, n_head=4, n_embd=128, block_size=128,
                 sft_steps=300, sft_lr=2e-3, rm_steps=200, rm_lr=5e-4, batch=32, min_chars=100,
                 n_prompts=300, max_new_tokens=80, dpo_steps=160, dpo_lr=5e-5, dpo_batch=32, warmup=10,
                 optimizer="adamw", eval_every=20, n_eval=128, best_of="1,2,4,8,16",
                 runs="dpo:0.05,dpo:0.1,dpo:1,dpo:5,ft"),
    "imdb": dict(data="imdb", init="pretrained", model="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, sft_steps=1500, sft_lr=5e-5,
                 rm_steps=1500, rm_lr=2e-5, batch=32, min_chars=200, n_prompts=25000, max_new_tokens=64,
                 dpo_steps=1500, dpo_lr=1e-6, dpo_batch=64, warmup=150, optimizer="rmsprop", eval_every=100,
                 n_eval=512, best_of="1,2,4,8,16,64", runs="dpo:0.05,dpo:0.1,dpo:1,dpo:5,ft,ul:0.05,ul:0.1,ul:0.5,ul:1"),
}
METHODS = ("dpo", "ipo", "cdpo", "ft", "ul")  # a run is "method:param", e.g. dpo:0.1 (beta) or ul:0.5 (alpha)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="nanoDPO: the IMDb sentiment experiment of the DPO paper")
    p.add_argument("--preset", choices=PRESETS, help="default: imdb on CUDA, tiny otherwise")
    p.add_argument("--out", help="run folder (default out/<preset>)")
    p.add_argument("--data-dir", help="folder holding <data>.npz (default data/<data>)")
    p.add_argument("--init", choices=("scratch", "pretrained"), help="a GPT from scratch, or pretrained GPT-2")
    p.add_argument("--model", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a Hugging Face folder")
    p.add_argument("--runs", help="comma-separated runs, method:param with method in " + "/".join(METHODS))
    p.add_argument("--best-of", help="comma-separated N of the Best-of-N baseline")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impl", default="auto", help="log-prob path: auto | triton | reference (kernels/)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--figure", help="the frontier figure (default plots/<preset>_frontier.png)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="epsilon of conservative DPO (cdpo)")
    for k, v in PRESETS["tiny"].items():  # every preset value can be overridden: --dpo-steps 50
        if k not in ("data", "init", "runs", "best_of"):
            p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None)
    args = p.parse_args(argv)
    args.preset = args.preset or ("imdb" if args.device.startswith("cuda") else "tiny")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = args.out or os.path.join("out", args.preset)
    for run in args.runs.split(","):
        if run.partition(":")[0] not in METHODS:
            p.error(f"--runs: unknown method {run.partition(':')[0]!r} in {run!r}; expected one of {', '.join(METHODS)}")
    args.data_dir = args.data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", args.data)
    return args


# ----------------------------------------------------------------------------- distributed (torchrun)
def setup_distributed(args):
    """Under torchrun (RANK and WORLD_SIZE set): join the process group; each rank takes every
    world-th example of the global batch and DDP averages the gradients."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)


def rank_world():
    """(this process's rank, the number of processes): (0, 1) without torchrun."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def amp(args):
    """bf16 autocast on CUDA (the fused kernel then runs in bf16), nothing on a CPU."""
    return torch.autocast("cuda", torch.bfloat16) if args.device.startswith("cuda") else nullcontext()


def log(*a):
    if rank_world()[0] == 0:
        print(*a, flush=True)


# ----------------------------------------------------------------------------- 1. data
def load_data(args):
    path = os.path.join(args.data_dir, f"{args.data}.npz")
    if args.data == "tiny" and not os.path.exists(path):  # generated offline in seconds
        from data.tiny.prepare import prepare
        prepare(args.data_dir)
    return load_corpus(path)


def make_prompts(split, n, min_chars, rng):
    """Prefixes of 2-8 tokens of reviews longer than min_chars characters (the paper's protocol)."""
    ok = np.flatnonzero(split.chars > min_chars)
    pick = rng.choice(ok, size=min(n, len(ok)), replace=False)
    return [split.review(i)[: rng.integers(2, 9)].tolist() for i in pick]


# ----------------------------------------------------------------------------- batching
def pack(prompts, responses, block_size, pad=0):
    """Concatenate prompt and response ids (tokenised separately) into one right-padded batch.
    Returns idx (B, T) inputs, targets (B, T) = the sequence shifted by one, and mask (B, T): True
    where the target is a response token. Prompt and padding never enter a sum; the mask is explicit,
    not inferred from pad == EOS."""
    rows = []
    for p, r in zip(prompts, responses):
        if len(r) == 0:
            raise ValueError("empty response: every response must hold at least its EOS token")
        if len(p) >= block_size:
            raise ValueError(f"prompt of {len(p)} tokens does not fit block_size {block_size}")
        rows.append((p, r[: block_size + 1 - len(p)]))  # a too-long response is cut at the block size
    T = max(len(p) + len(r) for p, r in rows) - 1
    idx = torch.full((len(rows), T), pad, dtype=torch.long)
    targets = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        seq = torch.tensor(p + r)
        idx[i, : len(seq) - 1], targets[i, : len(seq) - 1] = seq[:-1], seq[1:]
        mask[i, len(p) - 1: len(seq) - 1] = True
    return idx, targets, mask


def logprobs(policy, ref, idx, targets, mask, args, with_kl=False):
    """Summed log-probs of the response tokens under the policy (with grad) and the reference:
    the hidden states go to the fused kernel with lm_head's weight; no logits are materialised."""
    raw = policy.module if hasattr(policy, "module") else policy
    h = policy(idx)
    h_ref = w_ref = None
    if ref is not None:
        with torch.no_grad():
            h_ref, w_ref = ref(idx), ref.lm_head.weight
    return sequence_logprobs(h, raw.lm_head.weight, h_ref, w_ref, targets, mask, with_kl=with_kl, impl=args.impl)


# ----------------------------------------------------------------------------- the losses
def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, kind="dpo", label_smoothing=0.0):
    """The DPO loss (Eq. 7) and its variants, from summed response log-probs (not averaged).
    pi_c, pi_r: Shape (batch,). log pi_theta(y_w | x) and log pi_theta(y_l | x), chosen and rejected.
    ref_c, ref_r: Shape (batch,). The same under the frozen reference pi_ref.
    beta: the strength of the KL constraint. The implicit reward is beta * log(pi / pi_ref); a small
        beta lets the policy move far from pi_ref (more reward, more KL), a large one holds it close.
    kind: 'dpo':  -log sigmoid(beta * h), h = (pi_c - ref_c) - (pi_r - ref_r)
          'cdpo': conservative DPO, labels flipped with probability label_smoothing
          'ipo':  (h - 1 / (2 beta))^2 (Azar et al. 2023), with summed log-probs
    Returns losses Shape (batch,), and the rewards beta * (pi - ref) of chosen and rejected (detached)."""
    h = (pi_c - ref_c) - (pi_r - ref_r)
    if kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        eps = label_smoothing if kind == "cdpo" else 0.0
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return losses, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


def unlikelihood_loss(tok_c, mask_c, tok_r, mask_r, alpha):
    """Preferred-FT (alpha = 0) and Unlikelihood: raise log p of the chosen tokens and push down the
    rejected ones with -log(1 - p) (Welleck et al. 2019). tok_*: Shape (batch, T) per-token log-probs."""
    nll = -(tok_c.sum() / mask_c.sum())
    if alpha == 0:
        return nll
    p_r = tok_r.exp().clamp(max=1 - 1e-6)
    return nll - alpha * (torch.log1p(-p_r) * mask_r).sum() / mask_r.sum()


# ----------------------------------------------------------------------------- one training loop
def train(name, model, loss_fn, get_batch, steps, lr, args, optimizer="adamw", warmup=0, evaluate=None, stop_at=None):
    """Train `model` for `steps` steps on get_batch(step) with loss_fn(model, batch) -> (loss, metrics).
    Serves SFT, the reward model and every DPO run. Its folder out/<...>/<name>/ holds ckpt.pt while
    running (resumed from after an interruption) and model.pt when done (the stage is then skipped)."""
    folder, (rank, world) = os.path.join(args.out, name), rank_world()
    final, ckpt, evals = (os.path.join(folder, f) for f in ("model.pt", "ckpt.pt", "eval.jsonl"))
    if os.path.exists(final):
        model.load_state_dict(load_checkpoint(final))
        log(f"[{name}] done already: {final}")
        return model
    os.makedirs(folder, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.RMSprop(params, lr=lr) if optimizer == "rmsprop" else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = 0
    if os.path.exists(ckpt):  # resume: model, optimizer, step; evaluations after that step are redone
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        if rank == 0 and os.path.exists(evals):
            kept = [line for line in open(evals) if json.loads(line)["step"] < start]
            write_atomic(evals, lambda f: f.write("".join(kept).encode()))
        log(f"[{name}] resumed at step {start} from {ckpt}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    t0, tokens, last_kl = time.time(), 0, ""
    for step in range(start, steps + 1):
        if evaluate is not None and rank == 0 and (step % args.eval_every == 0 or step == steps):
            record = dict(step=step, **evaluate(model, step))
            with open(evals, "a") as f:
                f.write(json.dumps(record) + "\n")
            log(f"[{name}] eval step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"))
            last_kl = f" kl {record['kl']:.2f}"  # the progress lines show the latest evaluation's KL
        if step == steps:
            break
        for g in opt.param_groups:  # 1. learning rate: linear warm-up, then constant (as in the paper)
            g["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        batch = [x.to(args.device) for x in get_batch(step)]  # 2. this rank's share of the batch
        with amp(args):  # 3. forward, loss
            loss, metrics = loss_fn(ddp, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{name}] loss is {loss.item()} at step {step}; the last checkpoint is {ckpt}")
        loss.backward()  # 4. backward (DDP averages the gradients over ranks), clip, step
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch[0].numel() * world
        if step % args.log_every == 0 or step == steps - 1:  # 5. log
            dt = time.time() - t0
            left = dt / (step + 1 - start) * (steps - step - 1)
            log(f"[{name}] step {step:5d} loss {loss.item():.4f} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                + f"{last_kl} grad {grad_norm:.2f} | {tokens / dt:,.0f} tok/s, {left:.0f}s left")
        if rank == 0 and (step + 1) % args.eval_every == 0:  # 6. checkpoint (write, then rename)
            save_checkpoint(dict(model=model.state_dict(), opt=opt.state_dict(), step=step + 1), ckpt)
        if stop_at is not None and step + 1 == stop_at:
            return model  # tests simulate an interruption here
    if rank == 0:
        save_checkpoint(model.state_dict(), final)
        if os.path.exists(ckpt):
            os.remove(ckpt)
    if world > 1:
        torch.distributed.barrier()  # every rank sees the finished stage before the next one starts
    log(f"[{name}] {steps - start} steps in {time.time() - t0:.1f}s")
    return model


# ----------------------------------------------------------------------------- policy and reference: one GPT, a copy frozen
def make_model(args, vocab_size, score_head=False):
    if args.init == "pretrained":
        return GPT.from_pretrained(args.model, dropout=0.0, score_head=score_head).to(args.device)
    cfg = GPTConfig(block_size=args.block_size, vocab_size=vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                    n_embd=args.n_embd, score_head=score_head)
    torch.manual_seed(args.seed)
    return GPT(cfg).to(args.device)


# ----------------------------------------------------------------------------- 5. DPO and the baselines
def pair_loss(model, batch, args, ref, method, param):
    idx, targets, mask = batch  # chosen rows first, then the rejected ones
    n = idx.size(0) // 2
    out = logprobs(model, None if method in ("ft", "ul") else ref, idx, targets, mask, args)  # both in one forward
    if method in ("ft", "ul"):
        alpha = 0.0 if method == "ft" else param
        return unlikelihood_loss(out.token_pol[:n], mask[:n], out.token_pol[n:], mask[n:], alpha), {}
    losses, r_c, r_r = dpo_loss(out.seq_pol[:n], out.seq_pol[n:], out.seq_ref[:n], out.seq_ref[n:], param, method,
                                args.label_smoothing)
    return losses.mean(), {"acc": (r_c > r_r).float().mean().item(), "margin": (r_c - r_r).mean().item(),
                           "chosen": r_c.mean().item(), "rejected": r_r.mean().item(),
                           "logp_c": out.seq_pol[:n].mean().item(), "logp_r": out.seq_pol[n:].mean().item()}


def pair_batches(pairs, args, seed):
    """get_batch(step): this rank's share of dpo_batch pairs, chosen and rejected packed into one batch."""
    def get_batch(step):
        rank, world = rank_world()
        rows = np.random.default_rng([seed, step]).integers(len(pairs["prompt"]), size=args.dpo_batch)[rank::world]
        prompts = [pairs["prompt"][i] for i in rows]
        return pack(prompts + prompts, [pairs["chosen"][i] for i in rows] + [pairs["rejected"][i] for i in rows],
                    args.block_size)
    return get_batch


# ----------------------------------------------------------------------------- 6. evaluation
@torch.no_grad()
def reward(rm, prompts, responses, args, eot):
    """r*(x, y) = p(positive) of the classifier on EOT + prompt + response + EOT, as in its training."""
    seqs = [p + [t for t in r if t != eot] + [eot] for p, r in zip(prompts, responses)]
    out = []
    for i in range(0, len(seqs), 256):
        chunk = seqs[i:i + 256]
        idx, _, mask = (x.to(args.device) for x in pack([[eot]] * len(chunk), chunk, args.block_size, eot))
        with amp(args):
            out.append(torch.sigmoid(rm.score(rm(idx), mask).float()).cpu())
    return torch.cat(out)


@torch.no_grad()
def sample(model, prompts, args, eot, seed):
    """One completion per prompt at temperature 1 (no top-k), as token lists ending in EOS if it came."""
    out = []
    g = torch.Generator(device=args.device).manual_seed(seed)
    for i in range(0, len(prompts), 256):
        idx, pmask = left_pad(prompts[i:i + 256], eot)
        with amp(args):
            new, new_mask = model.generate(idx.to(args.device), pmask.to(args.device), args.max_new_tokens,
                                           temperature=1.0, eos_id=eot, generator=g)
        out += [row[m].tolist() for row, m in zip(new.cpu(), new_mask.cpu())]
    return out


@torch.no_grad()
def evaluate(policy, ref, rm, prompts, args, eot):
    """Mean r* of policy samples on held-out prompts, and KL(pi || pi_ref) on those samples: exact (the
    per-token KL over the whole vocabulary, summed over the response) and sampled (sum of log-ratios)."""
    policy.eval()
    # the same seed at every evaluation of every run (common random numbers): differences between
    # steps and runs then come from the policies more than from the draw
    responses = sample(policy, prompts, args, eot, args.seed)
    r = reward(rm, prompts, responses, args, eot)
    kl, kl_sampled = [], []
    for i in range(0, len(prompts), 64):
        p = prompts[i:i + 64]
        resp = [x if x else [eot] for x in responses[i:i + 64]]  # an empty sample still has its EOS
        idx, targets, mask = (x.to(args.device) for x in pack(p, resp, args.block_size))
        with amp(args):
            out = logprobs(policy, ref, idx, targets, mask, args, with_kl=True)
        kl.append(out.kl.sum(-1).float().cpu())
        kl_sampled.append((out.seq_pol - out.seq_ref).float().cpu())
    policy.train()
    return dict(reward=r.mean().item(), kl=torch.cat(kl).mean().item(), kl_sampled=torch.cat(kl_sampled).mean().item(),
                length=float(np.mean([len(x) for x in responses])))


# ----------------------------------------------------------------------------- the whole experiment
def main(argv=None):
    import stages  # the stages around DPO; it imports this file's helpers, so it is imported here
    args = get_args(argv)
    setup_distributed(args)
    log(f"nanoDPO: preset {args.preset} on {args.device} -> {args.out}")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    data = load_data(args)
    enc = get_tokenizer(data["tokenizer"])
    eot, vocab = enc.eot_token, enc.n_vocab
    rng = np.random.default_rng(args.seed)
    train_prompts = make_prompts(data["train"], args.n_prompts, args.min_chars, rng)
    eval_prompts = make_prompts(data["test"], args.n_eval, args.min_chars, rng)

    sft = train("sft", make_model(args, vocab), lambda m, b: stages.sft_loss(m, b, args),
                stages.review_batches(data["train"], args, eot, args.seed, crop=False), args.sft_steps, args.sft_lr, args,
                warmup=args.warmup)
    rm = make_model(args, vocab, score_head=True)
    if args.init == "scratch":  # a classifier from scratch learns slowly: start from the SFT model's weights
        rm.load_state_dict(sft.state_dict(), strict=False)
    rm = train("reward", rm, lambda m, b: stages.reward_loss(m, b, args),
               stages.review_batches(data["train"], args, eot, args.seed + 1, crop=True), args.rm_steps, args.rm_lr, args,
               warmup=args.warmup)
    stages.test_accuracy(rm.eval(), data["test"], args, eot)
    pairs = stages.make_pairs(sft, rm, train_prompts, args, eot)
    stages.best_of_n(sft, rm, eval_prompts, args, eot)
    ref = copy.deepcopy(sft).eval().requires_grad_(False)
    for run in args.runs.split(","):
        method, _, param = run.partition(":")
        param = float(param) if param else 0.0
        policy = copy.deepcopy(sft).train()
        train(f"runs/{run.replace(':', '_')}", policy, lambda m, b: pair_loss(m, b, args, ref, method, param),
              pair_batches(pairs, args, args.seed + 3), args.dpo_steps, args.dpo_lr, args, optimizer=args.optimizer,
              warmup=args.warmup, evaluate=lambda m, step: evaluate(m, ref, rm, eval_prompts, args, eot))
    if rank_world()[0] == 0:  # 7. the figure
        from plots.frontier import plot_frontier
        log(f"wrote {plot_frontier(args.out, args.figure or os.path.join('plots', f'{args.preset}_frontier.png'))}")
    log(f"nanoDPO: done in {time.time() - t_start:.0f}s")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
