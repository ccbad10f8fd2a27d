"""
The machinery under both algorithms (dpo.py and ppo.py): the settings, the data and its batches, the
log-prob call into the fused kernel, the model, one training loop, and the helpers for torchrun.
Nothing here knows DPO or PPO; they pass in their losses and batches.

The pipeline (one numbering, used by every file):
  1. data       labelled movie reviews, and prompts cut from them                 common.py
  2. SFT        the reference policy pi_ref, a language model on the reviews        stages.py
  3. reward     the ground truth r*(x, y): a sentiment classifier, p(positive)      stages.py
  4. pairs      4 samples of pi_ref per prompt, all 6 pairs, the higher r* chosen   stages.py
  5. training   DPO and its baselines on the pairs (dpo.py); PPO on a reward (ppo.py)
  6. evaluate   mean r* of policy samples and the exact KL(pi || pi_ref)            stages.py
  7. figure     reward against KL                                                   plots/frontier.py
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from data.corpus import (OneLineParser, UsageError, append_jsonl, load_checkpoint, load_corpus, read_jsonl,
                         save_checkpoint, write_atomic)
from data.tiny.prepare import prepare as prepare_tiny
from kernels import sequence_logprobs
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------- settings
PRESETS = {
    "tiny": dict(data="tiny", init="scratch", n_layer=4, n_head=4, n_embd=128, block_size=64,
                 sft_steps=300, sft_lr=2e-3, rm_steps=200, rm_lr=2e-4, batch=32, min_chars=100,
                 n_prompts=300, max_new_tokens=48, dpo_steps=160, dpo_lr=5e-5, dpo_batch=16, warmup=10,
                 optimizer="adamw", eval_every=20, n_eval=128, best_of="1,2,4,8,16",
                 bt_steps=100, bt_lr=5e-4, ppo_iters=24, ppo_batch=64, ppo_epochs=4, ppo_minibatches=2,
                 ppo_lr=5e-5, ppo_eval_every=4, kl_horizon=128,
                 runs="dpo:0.05,dpo:0.1,dpo:1,dpo:5,ft,ppo:3,ppo:8,ppo-gt:3,ppo-gt:8,simpo:2,orpo:0.1,kto:0.1"),
    "imdb": dict(data="imdb", init="pretrained", model="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024,
                 sft_steps=1500, sft_lr=5e-5, rm_steps=1500, rm_lr=2e-5, batch=32, min_chars=200,
                 n_prompts=25000, max_new_tokens=64, dpo_steps=1500, dpo_lr=1e-6, dpo_batch=64, warmup=150,
                 optimizer="rmsprop", eval_every=100, n_eval=512, best_of="1,2,4,8,16,64",
                 bt_steps=4500, bt_lr=1e-5, ppo_iters=100, ppo_batch=1024, ppo_epochs=4, ppo_minibatches=16,
                 ppo_lr=1.4e-5, ppo_eval_every=10, kl_horizon=10000,
                 runs="dpo:0.05,dpo:0.1,dpo:1,dpo:5,ft,ul:0.05,ul:0.1,ul:0.5,ul:1,"
                      "ppo:3,ppo:6,ppo:9,ppo:12,ppo-gt:3,ppo-gt:6,ppo-gt:9,ppo-gt:12,simpo:2,orpo:0.1,kto:0.1"),
}
# a run is "method:param": the parameter is beta (dpo, ipo, cdpo, simpo, kto), lambda (orpo), alpha (ul), or the
# target KL (ppo, ppo-gt)
METHODS = ("dpo", "ipo", "cdpo", "simpo", "orpo", "kto", "ft", "ul", "ppo", "ppo-gt")


def parse_runs(spec):
    """'dpo:0.1,ft,ppo:6' -> [('dpo', 0.1), ('ft', 0.0), ('ppo', 6.0)], or ValueError naming the bad run."""
    runs = []
    for run in spec.split(","):
        method, _, param = run.partition(":")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} in {run!r}; expected one of {', '.join(METHODS)}")
        try:
            value = float(param) if param else 0.0
        except ValueError:
            raise ValueError(f"{run!r}: the parameter {param!r} is not a number") from None
        need = {"dpo": "beta > 0, e.g. dpo:0.1", "ipo": "beta > 0, e.g. ipo:0.1", "cdpo": "beta > 0, e.g. cdpo:0.1",
                "simpo": "beta > 0, e.g. simpo:2", "kto": "beta > 0, e.g. kto:0.1",
                "ul": "alpha > 0, e.g. ul:0.5 (ul:0 is Preferred-FT: ft)", "ppo": "a target KL > 0, e.g. ppo:6",
                "ppo-gt": "a target KL > 0, e.g. ppo-gt:6"}
        if method in need and not value > 0:
            raise ValueError(f"{run!r}: {method} needs {need[method]}")
        if method == "orpo" and not (param and value >= 0):
            raise ValueError(f"{run!r}: orpo needs lambda >= 0, e.g. orpo:0.1")
        if method == "ft" and param:
            raise ValueError(f"{run!r}: ft takes no parameter")
        runs.append((method, value))
    return runs


def run_folder(method, param):
    """Where a run writes, under the run folder: runs/dpo_0.1, runs/ppo-gt_6, runs/ft."""
    return "runs/ft" if method == "ft" else f"runs/{method}_{param:g}"


HELP = {  # one line per preset setting; --help adds its tiny and imdb defaults from PRESETS
    "init": "a GPT from scratch (--n-layer, --n-head, --n-embd), or pretrained GPT-2 (--model)",
    "model": "the pretrained weights: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a Hugging Face folder",
    "n_layer": "transformer blocks of a model from scratch",
    "n_head": "attention heads of a model from scratch; must divide --n-embd",
    "n_embd": "width of a model from scratch",
    "block_size": "longest sequence in tokens, prompt and response together",
    "sft_steps": "steps of SFT, which makes the reference policy pi_ref",
    "sft_lr": "learning rate of SFT",
    "rm_steps": "steps of the sentiment classifier r*, the ground-truth reward",
    "rm_lr": "learning rate of the classifier r*",
    "batch": "reviews per step of SFT and of r*; pairs per step of PPO's reward model",
    "min_chars": "prompts are cut from reviews longer than this many characters",
    "n_prompts": "training prompts; 4 samples of pi_ref on each make the preference pairs",
    "max_new_tokens": "longest sampled response, in tokens",
    "dpo_steps": "steps of each DPO-family run (every run but ppo and ppo-gt)",
    "dpo_lr": "learning rate of the DPO-family runs",
    "dpo_batch": "preference pairs per step of the DPO-family runs",
    "warmup": "steps of linear learning-rate warm-up, in every stage",
    "optimizer": "optimizer of the DPO-family and PPO runs",
    "eval_every": "steps between evaluations of the runs and of PPO's reward model, and between checkpoints",
    "n_eval": "held-out test prompts each evaluation samples a response for",
    "best_of": "comma-separated N of the Best-of-N baseline",
    "bt_steps": "steps of PPO's reward model (Bradley-Terry on the pairs)",
    "bt_lr": "learning rate of PPO's reward model",
    "ppo_iters": "rollouts of each PPO run",
    "ppo_batch": "prompts per rollout, one response each",
    "ppo_epochs": "passes over each rollout",
    "ppo_minibatches": "minibatches per pass over a rollout",
    "ppo_lr": "learning rate of the PPO runs",
    "ppo_eval_every": "rollouts between evaluations (and checkpoints) of a PPO run",
    "kl_horizon": "horizon of PPO's adaptive KL controller, in samples",
    "runs": "comma-separated runs, method:param with method in " + "/".join(METHODS),
}
CHOICES = {"init": ("scratch", "pretrained"), "optimizer": ("adamw", "rmsprop")}


def parser():
    """The command line. A preset setting's help ends with its defaults, read from PRESETS so it cannot drift."""
    preset = lambda k: f" [tiny: {PRESETS['tiny'].get(k, '-')}; imdb: {PRESETS['imdb'].get(k, '-')}]"
    p = OneLineParser(description="nanoDPO: the IMDb sentiment experiment of the DPO paper")
    p.add_argument("--preset", choices=PRESETS,
                   help="the settings' defaults, shown [tiny; imdb] below (default: imdb on CUDA, tiny otherwise)")
    p.add_argument("--out", help="run folder, reused by a rerun (default out/<preset>)")
    p.add_argument("--data-dir", help="folder holding <data>.npz (default data/<data>; tiny: made there if missing)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the weights, batches and samples (default 1337)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default cuda where torch sees a GPU)")
    p.add_argument("--impl", default="auto", choices=("auto", "triton", "reference"),
                   help="log-prob path (kernels/): auto is the Triton kernel on CUDA, the reference elsewhere")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines (default 10)")
    p.add_argument("--figure", help="the frontier figure (default <out>/frontier.png)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="epsilon of conservative DPO, cdpo (default 0.1)")
    p.add_argument("--redo", action="store_true", help="make again every stage whose recorded settings differ")
    p.add_argument("--model", help=HELP["model"] + preset("model"))
    for k, v in PRESETS["tiny"].items():  # every preset value can be overridden: --dpo-steps 50
        if k != "data":
            p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, choices=CHOICES.get(k),
                           help=HELP.get(k, "") + preset(k))
    return p


def get_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    args.preset = args.preset or ("imdb" if args.device.startswith("cuda") else "tiny")
    if args.model is not None and (args.init or PRESETS[args.preset]["init"]) == "scratch":
        p.error(f"--model {args.model}: the {args.preset} preset trains a GPT from scratch; add --init pretrained")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = args.out or os.path.join("out", args.preset)
    check_args(p, args)
    args.data_dir = args.data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", args.data)
    return args


def check_args(p, args):
    """Every mistake that would only fail later, refused in one line before any work."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        p.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is visible to torch; use --device cpu")
    if args.device.startswith("cuda:") and int(args.device[5:]) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        p.error(f"--device {args.device}: torch sees {n} GPUs, cuda:0 to cuda:{n - 1}")
    if args.impl == "triton" and args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--impl triton: the Triton kernel needs --device cuda, or TRITON_INTERPRET=1 on a CPU (slow); "
                "--impl auto takes the reference there")
    if args.init == "pretrained" and args.model not in GPT.SIZES and not os.path.isdir(args.model or ""):
        p.error(f"--model {args.model}: expected one of {', '.join(GPT.SIZES)} or a Hugging Face folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: is a file; expected a run folder")
    if args.seed < 0:
        p.error(f"--seed {args.seed}: expected a whole number >= 0")
    if args.log_every < 1:
        p.error(f"--log-every {args.log_every}: expected a positive number")
    for k, v in PRESETS["tiny"].items():  # sizes, steps and rates: positive (warm-up may be 0)
        least = 0 if k == "warmup" else 1 if isinstance(v, int) else 1e-30
        if isinstance(v, (int, float)) and not getattr(args, k) >= least:
            p.error(f"--{k.replace('_', '-')}: expected a positive number, got {getattr(args, k)}")
    if args.init == "scratch" and args.n_embd % args.n_head:
        p.error(f"--n-head {args.n_head}: expected a divisor of --n-embd {args.n_embd}")
    if args.init == "pretrained" and args.model in GPT.SIZES and args.block_size > 1024:
        p.error(f"--block-size {args.block_size}: GPT-2 ({args.model}) has 1024 positions")
    if args.block_size < max(18, args.max_new_tokens + 9):  # the classifier's crops take 16 tokens and more
        p.error(f"--block-size {args.block_size}: expected at least 18, and room for a prompt of up to 8 tokens "
                f"and --max-new-tokens {args.max_new_tokens}")
    if not all(n.strip().isdigit() and int(n) > 0 for n in args.best_of.split(",")):
        p.error(f"--best-of {args.best_of}: expected comma-separated positive whole numbers, e.g. 1,2,4,8,16")
    if not 0 <= args.label_smoothing < 0.5:
        p.error(f"--label-smoothing {args.label_smoothing}: expected a flip probability in [0, 0.5)")
    try:
        args.run_list = parse_runs(args.runs)
    except ValueError as e:
        p.error(f"--runs: {e}")
    methods, world = {m for m, _ in args.run_list}, int(os.environ.get("WORLD_SIZE", 1))
    ppo_runs, dpo_runs = methods & {"ppo", "ppo-gt"}, methods - {"ppo", "ppo-gt"}
    for k in ["batch"] + ["dpo_batch"] * bool(dpo_runs) + ["ppo_batch"] * bool(ppo_runs):
        if getattr(args, k) < world:  # under torchrun each rank takes every world-th row of a batch
            p.error(f"--{k.replace('_', '-')} {getattr(args, k)}: fewer rows than the {world} torchrun processes")
    if ppo_runs and args.ppo_batch // world < args.ppo_minibatches:
        p.error(f"--ppo-minibatches {args.ppo_minibatches} is more than --ppo-batch {args.ppo_batch}"
                + f" / {world} processes" * (world > 1) + ": a minibatch would be empty")
    if ppo_runs and args.ppo_batch > args.n_prompts:
        p.error(f"--ppo-batch {args.ppo_batch} is more than --n-prompts {args.n_prompts}: a rollout draws "
                f"--ppo-batch different training prompts")


# ----------------------------------------------------------------------------- the settings each stage was made with
def stage_plan(args, data_sha256):
    """{output under --out: the settings it depends on, those of the stages it is built from included},
    in pipeline order, for the stages this command needs. A changed upstream setting so changes every
    stage after it too. data_sha256 (data_digest) names the data by its content, not by its folder."""
    pick = lambda *keys: {k: getattr(args, k) for k in keys}
    sft = pick("data", "init", "n_layer", "n_head", "n_embd", "block_size", "batch", "warmup", "seed", "sft_steps",
               "sft_lr") | {"model": args.model if args.init == "pretrained" else None, "data_sha256": data_sha256}
    reward = sft | pick("rm_steps", "rm_lr", "max_new_tokens")  # its crops cover the scored length
    pairs = reward | pick("n_prompts", "min_chars")
    prompts = pairs | pick("n_eval")  # the held-out prompts are drawn after the training prompts
    plan = {"sft": sft, "reward": reward, "pairs.pt": pairs, "best_of_n.jsonl": prompts | pick("best_of")}
    methods = {m for m, _ in args.run_list}
    if "ppo" in methods:
        plan["pairs_heldout.pt"] = prompts
        plan["reward_model"] = prompts | pick("bt_steps", "bt_lr", "eval_every")
    for m in methods & {"ppo", "ppo-gt"}:
        plan[f"score_norm_{m}.json"] = plan["reward_model" if m == "ppo" else "pairs.pt"]
    for method, param in args.run_list:
        if method in ("ppo", "ppo-gt"):
            plan[run_folder(method, param)] = prompts | plan[f"score_norm_{method}.json"] | pick(
                "optimizer", "ppo_iters", "ppo_batch", "ppo_epochs", "ppo_minibatches", "ppo_lr", "ppo_eval_every",
                "kl_horizon")
        else:
            extra = pick("label_smoothing") if method == "cdpo" else {}
            plan[run_folder(method, param)] = prompts | pick("dpo_steps", "dpo_lr", "dpo_batch", "optimizer",
                                                             "eval_every") | extra
    return plan


def check_settings(out, plan, redo):
    """Compare each stage's settings with those recorded in out/settings.json when it was made. A stage
    made with other settings (or by an older nanoDPO that kept no record) is refused with one line, or
    with redo deleted so that it is made again; then the plan is recorded. Rank 0 checks."""
    on_rank0(lambda: _check_settings(out, plan, redo))


def on_rank0(fn):
    """fn() on rank 0 only; a UsageError it raises is raised on every rank of torchrun, so that all stop together."""
    error = ""
    if rank_world()[0] == 0:
        try:
            fn()
        except UsageError as e:
            error = str(e)
    if torch.distributed.is_initialized():
        verdict = [error]
        torch.distributed.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        raise UsageError(error)


def _check_settings(out, plan, redo):
    path = os.path.join(out, "settings.json")
    recorded = {}
    if os.path.exists(path):
        with open(path) as f:
            try:
                recorded = json.load(f)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path} is not JSON ({e.msg}, line {e.lineno}); fix it, or delete it and add --redo "
                                 f"to make every stage again") from None
    for stage, settings in plan.items():
        target = os.path.join(out, stage)
        if not os.path.exists(target) or recorded.get(stage) == settings:
            continue
        old = recorded.get(stage, {})
        diff = ", ".join(f"{k} {old.get(k, 'unset')} -> {v}" for k, v in settings.items() if old.get(k, "unset") != v)
        why = f"was made with other settings ({diff})" if stage in recorded else "has no record of its settings"
        if not redo:
            raise UsageError(f"{target} {why}: use another --out, or --redo to make it and every stage after it again")
        log(f"[redo] {target} {why}: making it again")
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    write_atomic(path, lambda f: f.write(json.dumps(recorded | plan, indent=1).encode()))


@contextmanager
def locked(out):
    """Hold out/.lock while a command uses the run folder: a second command into it stops in one line,
    instead of doubling its records and overwriting its checkpoints. The system drops an flock when
    its process dies, so a killed command leaves no stale lock. Rank 0 holds it for all of a torchrun."""
    held = []

    def take():
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise UsageError(f"{out} is in use by another command (process {holder}); wait for it, or use "
                             f"another --out") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        held.append(f)
    on_rank0(take)
    try:
        yield
    finally:
        for f in held:
            f.close()


# ----------------------------------------------------------------------------- torchrun, devices, logging
def setup_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group and return this rank's device; each rank
    then takes every world-th example of a global batch and DDP averages the gradients. A CUDA device
    becomes the current one, in one process too: Triton launches on the current device."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
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


def derive_seed(*keys):
    """A seed for torch.Generator from integers (a base seed, an iteration, a rank, an index)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


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


def data_digest(data):
    """sha256 of a corpus's tokenizer, tokens, labels and lengths: the data's identity in the settings
    record (the .npz file's own bytes also hold the times its members were written)."""
    h = hashlib.sha256(data["tokenizer"].encode())
    for s in ("train", "test"):
        for a in (data[s].tokens, data[s].offsets, data[s].labels, data[s].chars):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def check_data(args, data):
    """The sizes that depend on the data, checked before SFT: enough long reviews for the prompts asked for."""
    path = os.path.join(args.data_dir, f"{args.data}.npz")
    ppo_runs = {m for m, _ in args.run_list} & {"ppo", "ppo-gt"}
    usable = {s: int((data[s].chars > args.min_chars).sum()) for s in ("train", "test")}
    heldout = max(32, args.n_prompts // 10) if "ppo" in ppo_runs else 0  # the reward model's held-out pairs
    if args.n_eval + heldout > usable["test"]:
        extra = f" + {heldout} held-out prompts of PPO's reward model" if heldout else ""
        raise UsageError(f"--n-eval {args.n_eval}{extra}: the test split of {path} has {usable['test']} reviews "
                         f"longer than --min-chars {args.min_chars}")
    if ppo_runs and args.ppo_batch > usable["train"]:
        raise UsageError(f"--ppo-batch {args.ppo_batch}: the train split of {path} has {usable['train']} reviews "
                         f"longer than --min-chars {args.min_chars} to cut prompts from")


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
            raise ValueError(f"prompt of {len(p)} tokens and its beginning-of-text token do not fit block_size {block_size}")
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
    h = policy(idx) if hidden is None else hidden
    h_ref = w_ref = None
    if ref is not None:
        with torch.no_grad():
            h_ref, w_ref = ref(idx), ref.lm_head.weight
    return sequence_logprobs(h, unwrap(policy).lm_head.weight, h_ref, w_ref, targets, mask, with_kl=with_kl, impl=impl)


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
