"""
The machinery under both algorithms (dpo.py and ppo.py): the helpers for torchrun, the data and its batches,
the log-prob call into the fused kernel, the model, one training loop. Nothing here knows DPO or PPO; they pass
in their losses and batches. The settings of a command and its stages are in settings.py.

The pipeline (one numbering, used by every file):
  1. data       labelled movie reviews, and prompts cut from them                 common.py
  2. SFT        the reference policy pi_ref, a language model on the reviews        stages.py
  3. reward     the ground truth r*(x, y): a sentiment classifier, p(positive)      stages.py
  4. pairs      4 samples of pi_ref per prompt, all 6 pairs, the higher r* chosen   stages.py
  5. training   DPO and its baselines on the pairs (dpo.py); PPO on a reward (ppo.py)
  6. evaluate   mean r* of policy samples and the exact KL(pi || pi_ref)            stages.py
  7. figure     reward against KL                                                   plots/frontier.py
"""
import json
import os
import time
import zlib
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from data.corpus import append_jsonl, load_checkpoint, load_corpus, read_jsonl, save_checkpoint, write_atomic
from data.tiny.prepare import prepare as prepare_tiny
from kernels import sequence_logprobs
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------- torchrun, devices, logging
def setup_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group and return this rank's device; each rank
    then takes every world-th example of a global batch and DDP averages the gradients. A CUDA device
    becomes the current one, in one process too: Triton launches on the current device."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if device == "cuda":  # set_device needs an index
        device = f"cuda:{torch.cuda.current_device()}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    return device


def rank_world():
    """(this process's rank, the number of processes): (0, 1) without torchrun."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def global_mean(*xs, device):
    """Means of scalars over every rank (the plain values without torchrun). device: this rank's device,
    where the all-reduce happens (NCCL takes CUDA tensors only)."""
    t = torch.tensor(xs, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t.tolist()


@contextmanager
def local_rank_first():
    """Under torchrun, local rank 0 runs the block first (a download, a data preparation) and the other
    ranks of its machine run it after, when they find its files; one process just runs it."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def derive_seed(seed, purpose, *keys):
    """A seed for torch.Generator from the run's seed, what it is for ('pairs.pt', 'rollout', ...) and integers
    (an iteration, a rank, an index): different purposes never share a random stream."""
    return int(np.random.SeedSequence([seed, zlib.crc32(purpose.encode()), *keys]).generate_state(1)[0])


def sharded(fn, items, chunk=256):
    """[fn(items[i:i + chunk], i) for each chunk], flattened in order: fn returns a list per chunk. Under
    torchrun the chunks are dealt round-robin over the ranks and every rank gets the whole result. fn
    sees the chunk's start i (seed by it): the result then does not depend on the number of ranks."""
    rank, world = rank_world()
    starts = range(0, len(items), chunk)
    done = {i: fn(items[i:i + chunk], i) for n, i in enumerate(starts) if n % world == rank}
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, done)
        done = {i: x for part in parts for i, x in part.items()}
    return [x for i in starts for x in done[i]]


def unwrap(model):
    """The model itself, inside a DistributedDataParallel wrapper or not."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def amp(device):
    """bf16 autocast on CUDA (the fused kernel then runs in bf16), nothing on a CPU."""
    return torch.autocast("cuda", torch.bfloat16) if str(device).startswith("cuda") else nullcontext()


def log(*a):
    if rank_world()[0] == 0:
        print(*a, flush=True)


# ----------------------------------------------------------------------------- 1. data
def load_data(data_dir, name):
    path = os.path.join(data_dir, f"{name}.npz")
    with local_rank_first():
        if name == "tiny" and (not os.path.exists(path) or load_corpus(path)["tokenizer"] != "words"):
            prepare_tiny(data_dir)  # generated offline in seconds; also replaces an older nanoDPO's byte-level corpus
    return load_corpus(path)


def make_prompts(split, n, min_chars, rng):
    """Prefixes of 2-8 tokens of reviews longer than min_chars characters (the paper's protocol)."""
    ok = np.flatnonzero(split.chars > min_chars)
    pick = rng.choice(ok, size=min(n, len(ok)), replace=False)
    return [split.review(i)[: rng.integers(2, 9)].tolist() for i in pick]


# ----------------------------------------------------------------------------- batching and log-probs
def layout(prompt, response, bos):
    """The one layout of every sequence in nanoDPO: a beginning-of-text token (the EOS id, as in GPT-2), the
    prompt, the response. SFT trains pi_ref on layout([], review + [EOS]); sampling starts from
    layout(prompt, []); every log-prob, KL and score reads layout(prompt, response). So pi_ref always sees
    text where it learned it: the first word of a review right after the beginning-of-text token."""
    return [bos] + list(prompt) + list(response)


def pack(prompts, responses, block_size, bos):
    """Lay out each (prompt, response) (tokenised separately) and right-pad them into one batch.
    Returns idx (B, T) inputs, targets (B, T) = the sequence shifted by one, and mask (B, T): True
    where the target is a response token. Prompt and padding never enter a sum; the mask is explicit,
    not inferred from pad == EOS."""
    rows = []
    for p, r in zip(prompts, responses):
        if len(r) == 0:
            raise ValueError("empty response: every response must hold at least one token")
        if len(p) + 1 >= block_size:
            raise ValueError(f"prompt of {len(p)} tokens and its beginning-of-text token do not fit "
                             f"block_size {block_size}")
        rows.append((len(p) + 1, layout(p, r, bos)[: block_size + 1]))  # a too-long response is cut at the block size
    T = max(len(seq) for _, seq in rows) - 1
    idx = torch.full((len(rows), T), bos, dtype=torch.long)
    targets = torch.full((len(rows), T), bos, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (n_prompt, seq) in enumerate(rows):
        seq = torch.tensor(seq)
        idx[i, : len(seq) - 1], targets[i, : len(seq) - 1] = seq[:-1], seq[1:]
        mask[i, n_prompt - 1: len(seq) - 1] = True
    return idx, targets, mask


def logprobs(policy, ref, idx, targets, mask, impl="auto", with_kl=False, hidden=None):
    """Per-token and summed log-probs of the response tokens under the policy (with grad) and the
    reference: the hidden states go to the fused kernel with lm_head's weight, so no logits exist.
    hidden: the policy's hidden states when the caller has them already (PPO's value head reads them too)."""
    h = policy(idx, lengths=real_lengths(mask)) if hidden is None else hidden
    h_ref = w_ref = None
    if ref is not None:
        with torch.no_grad():
            h_ref, w_ref = ref(idx, lengths=real_lengths(mask)), ref.lm_head.weight
    return sequence_logprobs(h, unwrap(policy).lm_head.weight, h_ref, w_ref, targets, mask, with_kl=with_kl, impl=impl)


def real_lengths(mask):
    """The real tokens of each row of a right-padded batch (pack's): up to its last masked position. (B, T) -> (B,).
    The model skips the padding after them in its MLPs (GPT.forward)."""
    return mask.size(1) - mask.flip(1).int().argmax(1)


def accuracy(margin):
    """The fraction of margins above 0, a tie counting half: a scorer that tells nothing apart scores 0.5."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()


def masked_mean(x, mask):
    """Mean of x over the positions where mask is True: x, mask (B, T) -> a scalar."""
    return (x * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------- the model
def make_model(args, vocab_size, score_head=False):
    """pretrained GPT-2 (args.model), or a GPT of the preset's shape from scratch, seeded by args.seed."""
    if args.init == "pretrained":
        with local_rank_first():  # one download per machine
            return GPT.from_pretrained(args.model, dropout=0.0, score_head=score_head).to(args.device)
    cfg = GPTConfig(block_size=args.block_size, vocab_size=vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                    n_embd=args.n_embd, score_head=score_head)
    torch.manual_seed(args.seed)
    return GPT(cfg).to(args.device)


# ----------------------------------------------------------------------------- one training loop
def train(name, model, loss_fn, get_batch, steps, lr, *, out, device, optimizer="adamw", warmup=0,
          eval_every=0, evaluator=None, log_every=10, state=None, ckpt_every=0):
    """Train `model` for `steps` steps on get_batch(step) with loss_fn(model, batch) -> (loss, metrics).
    Serves SFT, the classifier, the reward model and every DPO and PPO run. Its folder out/<name>/ holds
    ckpt.pt while running (resumed from after an interruption) and model.pt when done (then skipped).
    evaluator(model, step) -> dict is called every eval_every steps and appended to eval.jsonl (its list
    "samples", if any, to samples.jsonl). ckpt.pt is written every ckpt_every steps (default: at each evaluation).
    state: a dict the caller updates during training (PPO's KL coefficient), checkpointed with the model."""
    folder, (rank, world) = os.path.join(out, name), rank_world()
    final, ckpt, evals, samples = (os.path.join(folder, f)
                                   for f in ("model.pt", "ckpt.pt", "eval.jsonl", "samples.jsonl"))
    state = {} if state is None else state
    if os.path.exists(final):
        saved = load_checkpoint(final)
        model.load_state_dict(saved["model"])
        state.update(saved["state"])
        log(f"[{name}] done already: {final}")
        return model
    os.makedirs(folder, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.RMSprop(params, lr=lr) if optimizer == "rmsprop" else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = 0
    if os.path.exists(ckpt):  # resume: model, optimizer, state, step; evaluations after that step are redone
        saved = load_checkpoint(ckpt)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state.update(saved["state"])
        start = saved["step"]
        log(f"[{name}] resumed at step {start} from {ckpt}")
    for path in (evals, samples) if rank == 0 else ():  # a fresh start begins fresh files; a resumed one keeps the past
        if os.path.exists(path):
            kept = [r for r in read_jsonl(path) if r["step"] < start]
            write_atomic(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    t0, tokens, last_kl = time.time(), 0, ""
    every = eval_every or steps
    ckpt_every = ckpt_every or every
    for step in range(start, steps + 1):
        if evaluator is not None and rank == 0 and (step % every == 0 or step == steps):  # 1. evaluate
            record = dict(step=step, **evaluator(model, step))
            texts = record.pop("samples", [])  # a few samples to read, kept apart from the numbers
            append_jsonl(evals, [record])
            append_jsonl(samples, [dict(step=step, **x) for x in texts])
            log(f"[{name}] eval step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"))
            last_kl = f" kl {record['kl']:.2f}" if "kl" in record else ""  # progress lines show the latest KL
        if step == steps:
            break
        for g in opt.param_groups:  # 2. learning rate: linear warm-up, then constant (as in the paper)
            g["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        batch = [x.to(device) for x in get_batch(step)]  # 3. this rank's share of the batch
        with amp(device):  # 4. forward, loss
            loss, metrics = loss_fn(ddp, batch)
        finite = bool(torch.isfinite(loss))
        if global_mean(float(finite), device=loss.device)[0] < 1:  # every rank raises, none waits in DDP's all-reduce
            what = f"loss is {loss.item()}" if not finite else "loss is not finite on another rank"
            raise FloatingPointError(f"[{name}] {what} at step {step}; the last checkpoint is {ckpt}")
        loss.backward()  # 5. backward (DDP averages the gradients over ranks), clip, step
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch[0].numel() * world
        if step % log_every == 0 or step == steps - 1:  # 6. log
            dt = time.time() - t0
            left = dt / (step + 1 - start) * (steps - step - 1)
            log(f"[{name}] step {step:5d} loss {loss.item():.4f} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                + f"{last_kl} grad {grad_norm:.2f} | {tokens / dt:,.0f} tok/s, {left:.0f}s left")
        if rank == 0 and (step + 1) % ckpt_every == 0 and step + 1 < steps:  # 7. checkpoint (write, then rename)
            save_checkpoint(dict(model=model.state_dict(), opt=opt.state_dict(), state=state, step=step + 1), ckpt)
    if rank == 0:
        save_checkpoint(dict(model=model.state_dict(), state=state), final)
        if os.path.exists(ckpt):
            os.remove(ckpt)
    barrier()  # every rank sees the finished stage before the next one starts
    log(f"[{name}] {steps - start} steps in {time.time() - t0:.1f}s")
    return model
