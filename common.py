"""
The machinery under every stage and algorithm: torchrun helpers, the one sequence layout and its
batches, the log-prob call into the fused kernel, the helpers each training loop calls (resume, the
learning rate, the finite-loss check, a step's log line, evaluations, checkpoints), and `fit`, the
loop of the stages that only learn from batches. dpo.py and ppo.py write their own loops.

The pipeline (one numbering, used by every file):
  1. data        labelled movie reviews, and prompts cut from them                   stages.py
  2. SFT         the reference policy pi_ref, a language model on the reviews          stages.py
  3. classifier  the ground truth r*(x, y): a sentiment classifier, p(positive)        stages.py
  4. pairs       4 samples of pi_ref per prompt, all 6 pairs, the higher r* chosen     stages.py
  5. training    DPO and its baselines on the pairs (dpo.py); PPO, RLOO, GRPO (ppo.py)
  6. evaluate    mean r* of policy samples and the exact KL(pi || pi_ref)              stages.py
  7. figure      reward against KL                                            plots/frontier.py
experiment.py runs them all (python dpo.py).
"""
import datetime
import json
import os
import time
import zlib
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from data.corpus import append_jsonl, load_checkpoint, read_jsonl, save_checkpoint, write_atomic
from kernels import sequence_logprobs
from model import model_record


# ------------------------------------------------------------ torchrun, devices, logging
WAIT_TIMEOUT = datetime.timedelta(hours=3)  # barrier's: gpt2-xl's 6.4 GB take 1.8 h at 1 MB/s
_wait_group = None  # the gloo group barrier() waits in, made by setup_distributed


def setup_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group and return this rank's device; each
    rank then takes every world-th example of a global batch and DDP averages the gradients. A CUDA
    device becomes the current one, in one process too: Triton launches on the current device."""
    global _wait_group
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        _wait_group = torch.distributed.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
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
    """Every rank waits for the others, up to WAIT_TIMEOUT, in a gloo group of its own: a long wait
    (local rank 0's download) trips neither NCCL's 10-minute timeout nor its watchdog."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier(group=_wait_group)


def global_mean(*xs, device):
    """Means of scalars over every rank (the plain values without torchrun). device: this rank's
    device, where the all-reduce happens (NCCL takes CUDA tensors only)."""
    t = torch.tensor(xs, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t.tolist()


@contextmanager
def local_rank_first():
    """Under torchrun, local rank 0 runs the block first (a download, a data preparation) and the
    other ranks of its machine run it after, when they find its files; one process just runs it."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def derive_seed(seed, purpose, *keys):
    """A seed for torch.Generator from the run's seed, what it is for ('pairs.pt', 'rollout', ...)
    and integers (an iteration, a rank, an index): different purposes never share a stream."""
    entropy = [seed, zlib.crc32(purpose.encode()), *keys]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def sharded(fn, items, chunk=256):
    """[fn(items[i:i + chunk], i) for each chunk], flattened in order: fn returns a list per chunk.
    Under torchrun the chunks are dealt round-robin over the ranks and every rank gets the whole
    result. fn sees the chunk's start i (seed by it): the result does not depend on the ranks."""
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
    cuda = str(device).startswith("cuda")
    return torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()


def is_main():
    """Rank 0 (the one process without torchrun): it writes the files and the log."""
    return rank_world()[0] == 0


def log(*a):
    if is_main():
        print(*a, flush=True)


# ------------------------------------------------------------ batching and log-probs
def layout(prompt, response, bos):
    """The one layout of every sequence in nanoDPO: a beginning-of-text token (the EOS id, as in
    GPT-2), the prompt, the response. SFT trains pi_ref on layout([], review + [EOS]); sampling
    starts from layout(prompt, []); every log-prob, KL and score reads layout(prompt, response). So
    pi_ref always sees text where it learned it: the first word of a review right after the
    beginning-of-text token."""
    return [bos] + list(prompt) + list(response)


def pack(prompts, responses, block_size, bos):
    """Lay out each (prompt, response) (tokenised separately), right-padded into one batch: idx
    (B, T) inputs, targets (B, T) the sequence shifted by one, mask (B, T) True where the target is
    a response token (explicit, not inferred from pad == EOS: prompt and padding enter no sum)."""
    rows = []
    for p, r in zip(prompts, responses):
        if len(r) == 0:
            raise ValueError("empty response: every response must hold at least one token")
        if len(p) + 1 >= block_size:
            raise ValueError(f"prompt of {len(p)} tokens and its beginning-of-text token do not "
                             f"fit block_size {block_size}")
        # a too-long response is cut at the block size
        rows.append((len(p) + 1, layout(p, r, bos)[: block_size + 1]))
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
    hidden: the policy's, when the caller has them already (PPO's value head reads them too)."""
    h = policy(idx, lengths=real_lengths(mask)) if hidden is None else hidden
    h_ref = w_ref = None
    if ref is not None:
        with torch.no_grad():
            h_ref, w_ref = ref(idx, lengths=real_lengths(mask)), ref.lm_head.weight
    w = unwrap(policy).lm_head.weight
    return sequence_logprobs(h, w, h_ref, w_ref, targets, mask, with_kl=with_kl, impl=impl)


def real_lengths(mask):
    """The real tokens of each row of a right-padded batch (pack's): up to its last masked position.
    (B, T) -> (B,). The model skips the padding after them in its MLPs (GPT.forward)."""
    return mask.size(1) - mask.flip(1).int().argmax(1)


def accuracy(margin):
    """The fraction of margins above 0, a tie counting half (telling nothing apart scores 0.5)."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()


def masked_mean(x, mask):
    """Mean of x over the positions where mask is True: x, mask (B, T) -> a scalar."""
    return (x * mask).sum() / mask.sum()


# ------------------------------------------------------------ what every training loop calls
# Each stage writes out/<name>/: ckpt.pt while it runs (resumed after an interruption), model.pt
# when done (a rerun skips it), eval.jsonl (evaluations), samples.jsonl, metrics.jsonl (steps).
def make_optimizer(model, name, lr):
    """AdamW (no weight decay) or RMSprop (--optimizer rmsprop, the paper's) on what trains."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def set_lr(opt, step, lr, warmup):
    """The learning rate: a linear warm-up over `warmup` steps, then constant (as in the paper)."""
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))


def resume(name, model, opt, out, state=None):
    """Where out/<name>'s loop starts, as (step, state). model.pt there: done, so (None, its state),
    the model loaded. ckpt.pt there: (its step, its state), model and optimizer restored, records
    from that step on dropped, to be made again. Otherwise (0, state) and fresh records. state: what
    a loop keeps besides the weights (PPO's KL coefficient), checkpointed with them."""
    folder, state = os.path.join(out, name), dict(state or {})
    final, ckpt = os.path.join(folder, "model.pt"), os.path.join(folder, "ckpt.pt")
    if os.path.exists(final):
        saved = load_checkpoint(final)
        model.load_state_dict(saved["model"])
        log(f"[{name}] done already: {final}")
        return None, state | saved["state"]
    os.makedirs(folder, exist_ok=True)
    start = 0
    if os.path.exists(ckpt):
        saved = load_checkpoint(ckpt)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state |= saved["state"]
        start = saved["step"]
        log(f"[{name}] resumed at step {start} from {ckpt}")
    records = [os.path.join(folder, f) for f in ("eval.jsonl", "samples.jsonl", "metrics.jsonl")]
    records = records if is_main() else []
    for path in records:  # a fresh start begins fresh records, a resumed one keeps the earlier ones
        if os.path.exists(path):
            kept = "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r["step"] < start)
            write_atomic(path, lambda f: f.write(kept.encode()))
    return start, state


def distributed(model):
    """The model DDP trains under torchrun (it averages the gradients over the ranks in backward);
    the model itself in one process. Sample, evaluate and checkpoint the model itself."""
    return torch.nn.parallel.DistributedDataParallel(model) if rank_world()[1] > 1 else model


def check_finite(loss, name, step, out):
    """Stop on a non-finite loss: all ranks raise, so none waits in DDP's all-reduce for another."""
    finite = bool(torch.isfinite(loss))
    if global_mean(float(finite), device=loss.device)[0] < 1:
        what = f"loss is {loss.item()}" if not finite else "loss is not finite on another rank"
        ckpt = os.path.join(out, name, "ckpt.pt")
        raise FloatingPointError(f"[{name}] {what} at step {step}; the last checkpoint is {ckpt}")


class Clock:
    """The speed of a loop from step `start` to `steps`: tokens per second and the time left."""

    def __init__(self, start, steps):
        self.t0, self.start, self.steps, self.tokens = time.time(), start, steps, 0

    def tick(self, tokens):
        self.tokens += tokens * rank_world()[1]  # every rank's share

    def speed(self, step):
        dt = time.time() - self.t0
        left = dt / (step + 1 - self.start) * (self.steps - step - 1)
        return f"{self.tokens / dt:,.0f} tok/s, {left:.0f}s left"


def log_step(name, step, metrics, clock, device, out=None, lr=None):
    """A step's progress line (every rank calls it): the metrics averaged over the ranks on device,
    the speed; with out, step, lr and them in out/<name>/metrics.jsonl. Returns the averages."""
    averaged = dict(zip(metrics, global_mean(*metrics.values(), device=device)))
    log(f"[{name}] step {step:5d} " + " ".join(f"{k} {v:.4g}" for k, v in averaged.items())
        + f" | {clock.speed(step)}")
    if out is not None and is_main():
        append_jsonl(os.path.join(out, name, "metrics.jsonl"), [dict(step=step, lr=lr) | averaged])
    return averaged


def write_evaluation(name, step, record, out):
    """Append an evaluation's numbers to out/<name>/eval.jsonl, its samples to samples.jsonl."""
    record = dict(step=step, **record)
    texts = record.pop("samples", [])  # a few samples to read, kept apart from the numbers
    if is_main():
        append_jsonl(os.path.join(out, name, "eval.jsonl"), [record])
        texts = [dict(step=step, **x) for x in texts]
        append_jsonl(os.path.join(out, name, "samples.jsonl"), texts)
    numbers = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step")
    log(f"[{name}] eval step {step}: {numbers}")


def save(name, step, model, opt, out, state=None, tokenizer=None):
    """ckpt.pt: what resume needs to go on after `step` steps, written by rank 0 (to a file, then
    renamed); with tokenizer, (name, words), the GPT's model_record: sample.py rebuilds it alone."""
    if is_main():
        weights = model_record(model, *tokenizer) if tokenizer else dict(model=model.state_dict())
        ckpt = weights | dict(opt=opt.state_dict(), state=state or {}, step=step)
        save_checkpoint(ckpt, os.path.join(out, name, "ckpt.pt"))


def finish(name, model, out, clock, state=None, tokenizer=None):
    """model.pt, the stage's end (its checkpoint removed; tokenizer: save's), once every rank is
    there. Returns the model."""
    final, ckpt = os.path.join(out, name, "model.pt"), os.path.join(out, name, "ckpt.pt")
    if is_main():
        weights = model_record(model, *tokenizer) if tokenizer else dict(model=model.state_dict())
        save_checkpoint(weights | dict(state=state or {}), final)
        if os.path.exists(ckpt):
            os.remove(ckpt)
    barrier()  # every rank sees the finished stage before the next one starts
    log(f"[{name}] {clock.steps - clock.start} steps in {time.time() - clock.t0:.1f}s")
    return model


# ------------------------------------------------------------ one small loop: SFT, r*, r_phi
def fit(name, model, loss_fn, get_batch, steps, lr, args, evaluate=None):
    """Train a model that only learns from batches: SFT (pi_ref), the classifier (r*) and PPO's
    reward model (r_phi). loss_fn(model, batch) -> (loss, metrics by name) on get_batch(step) ->
    tensors, AdamW, a checkpoint every args.eval_every steps, and evaluate(model) -> dict (if any)
    at the same steps and at the end."""
    opt = make_optimizer(model, "adamw", lr)
    start, _ = resume(name, model, opt, args.out)
    if start is None:
        return model
    ddp, clock = distributed(model), Clock(start, steps)
    for step in range(start, steps):
        if evaluate is not None and step % args.eval_every == 0:
            write_evaluation(name, step, evaluate(model), args.out)
        set_lr(opt, step, lr, args.warmup)
        batch = [x.to(args.device) for x in get_batch(step)]  # this rank's share of the batch
        with amp(args.device):
            loss, metrics = loss_fn(ddp, batch)
        check_finite(loss, name, step, args.out)
        loss.backward()  # DDP averages the gradients over the ranks
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.tick(batch[0].numel())
        if step % args.log_every == 0 or step == steps - 1:
            metrics = dict(loss=loss.item(), **metrics, grad=grad_norm)
            log_step(name, step, metrics, clock, args.device)
        if (step + 1) % args.eval_every == 0 and step + 1 < steps:
            save(name, step + 1, model, opt, args.out, tokenizer=args.tokenizer)
    if evaluate is not None:
        write_evaluation(name, steps, evaluate(model), args.out)
    return finish(name, model, args.out, clock, tokenizer=args.tokenizer)
