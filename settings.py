"""
The settings of a command: the presets (tiny, imdb) and their flags, checked in one line before any
work, and the sizes that depend on the data. record.py keeps the settings each stage was made with.
"""
import os
import re

import torch

from data.corpus import OneLineParser
from data.pairs import pairs_defaults
from errors import UsageError
from methods import METHODS, ONLINE, parse_runs, rollout_prompts
from model import GPT

# ----------------------------------------------------------------------------- settings
PRESETS = {
    "tiny": dict(data="tiny", init="scratch", n_layer=2, n_head=4, n_embd=128, block_size=64,
                 sft_steps=300, sft_lr=2e-3, classifier_steps=600, classifier_lr=5e-4, batch=32,
                 min_chars=100, n_prompts=300, max_new_tokens=48, dpo_steps=128, dpo_lr=1e-4,
                 dpo_batch=16, warmup=10, optimizer="adamw", eval_every=16, n_eval=128,
                 best_of="1,2,4,8,16", bt_steps=100, bt_lr=5e-4, ppo_iters=20, ppo_batch=64,
                 ppo_epochs=4, ppo_minibatches=2, ppo_lr=1e-4, ppo_eval_every=4, kl_horizon=128,
                 group=4,
                 runs="dpo:0.05,dpo:0.1,dpo:1,dpo:5,ft,ppo:3,ppo:8,ppo-gt:3,ppo-gt:8,rloo:0.05,"
                      "rloo:0.2,grpo:0.05,grpo:0.2,simpo:2,orpo:0.1,kto:0.1"),
    "imdb": dict(data="imdb", init="pretrained", model="gpt2", n_layer=12, n_head=12, n_embd=768,
                 block_size=1024, sft_steps=1500, sft_lr=5e-5, classifier_steps=1500,
                 classifier_lr=2e-5, batch=32, min_chars=200, n_prompts=25000, max_new_tokens=64,
                 dpo_steps=1500, dpo_lr=1e-6, dpo_batch=64, warmup=150, optimizer="rmsprop",
                 eval_every=100, n_eval=512, best_of="1,2,4,8,16,64", bt_steps=4500, bt_lr=1e-5,
                 ppo_iters=100, ppo_batch=1024, ppo_epochs=4, ppo_minibatches=16, ppo_lr=1.4e-5,
                 ppo_eval_every=10, kl_horizon=10000, group=4,
                 runs="dpo:0.05,dpo:0.1,dpo:1,dpo:5,ft,ul:0.05,ul:0.1,ul:0.5,ul:1,ppo:3,ppo:6,"
                      "ppo:9,ppo:12,ppo-gt:3,ppo-gt:6,ppo-gt:9,ppo-gt:12,rloo:0.05,rloo:0.2,"
                      "grpo:0.05,grpo:0.2,simpo:2,orpo:0.1,kto:0.1"),
}
HELP = {  # one line per preset setting; --help adds its tiny and imdb defaults from PRESETS
    "init": "a GPT from scratch (--n-layer, --n-head, --n-embd), or pretrained GPT-2 (--model)",
    "model": "the pretrained weights: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a Hugging Face "
             "folder",
    "n_layer": "transformer blocks of a model from scratch",
    "n_head": "attention heads of a model from scratch; must divide --n-embd",
    "n_embd": "width of a model from scratch",
    "block_size": "longest sequence in tokens, prompt and response together",
    "sft_steps": "steps of SFT, which makes the reference policy pi_ref (--pairs: 0 takes --model "
                 "as it is)",
    "sft_lr": "learning rate of SFT",
    "classifier_steps": "steps of the sentiment classifier r*, the ground-truth reward",
    "classifier_lr": "learning rate of the classifier r*",
    "batch": "reviews per step of SFT and of r*; pairs per step of PPO's reward model",
    "min_chars": "prompts are cut from reviews longer than this many characters",
    "n_prompts": "training prompts; 4 samples of pi_ref on each make the preference pairs",
    "max_new_tokens": "longest sampled response, in tokens",
    "dpo_steps": "steps of each DPO-family run (every run but the online ones: ppo, ppo-gt, rloo, "
                 "grpo)",
    "dpo_lr": "learning rate of the DPO-family runs",
    "dpo_batch": "preference pairs per step of the DPO-family runs",
    "warmup": "steps of linear learning-rate warm-up, in every stage",
    "optimizer": "optimizer of the DPO-family and PPO runs",
    "eval_every": "steps between evaluations of the runs and of PPO's reward model, and between "
                  "checkpoints",
    "n_eval": "held-out test prompts each evaluation samples a response for",
    "best_of": "comma-separated N of the Best-of-N baseline",
    "bt_steps": "steps of PPO's reward model (Bradley-Terry on the pairs)",
    "bt_lr": "learning rate of PPO's reward model",
    "ppo_iters": "rollouts of each online run (ppo, ppo-gt, rloo, grpo)",
    "ppo_batch": "samples per rollout: one per prompt (ppo), or --group per prompt (rloo, grpo)",
    "ppo_epochs": "passes over each rollout",
    "ppo_minibatches": "minibatches per pass over a rollout",
    "ppo_lr": "learning rate of the online runs",
    "ppo_eval_every": "rollouts between evaluations (and checkpoints) of an online run",
    "kl_horizon": "horizon of PPO's adaptive KL controller, in samples",
    "group": "samples per prompt in a rollout of rloo and grpo (at least 2; divides --ppo-batch)",
    "runs": "comma-separated runs, method:param with method in " + "/".join(METHODS),
}
CHOICES = {"init": ("scratch", "pretrained"), "optimizer": ("adamw", "rmsprop")}


def parser():
    """The command line. A preset setting's help ends with its defaults, read from PRESETS so it
    cannot drift."""
    preset = lambda k: (f" [tiny: {PRESETS['tiny'].get(k, '-')}; "
                        f"imdb: {PRESETS['imdb'].get(k, '-')}]")
    p = OneLineParser(description="nanoDPO: the IMDb sentiment experiment of the DPO paper")
    p.add_argument("--preset", choices=PRESETS,
                   help="the settings' defaults, shown [tiny; imdb] below "
                        "(default: imdb on CUDA, tiny otherwise)")
    p.add_argument("--out", help="run folder, reused by a rerun (default out/<preset>)")
    p.add_argument("--data-dir", help="folder holding <data>.npz (default data/<data>; tiny: made "
                                      "there if missing)")
    p.add_argument("--seed", type=int, default=1337,
                   help="seed of the weights, batches and samples (default 1337)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default cuda where torch sees a GPU)")
    p.add_argument("--impl", default="auto", choices=("auto", "triton", "reference"),
                   help="log-prob path (kernels/): auto is the Triton kernel on CUDA, the "
                        "reference elsewhere")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between progress lines (default 10)")
    p.add_argument("--figure", help="the frontier figure (default <out>/frontier.png)")
    p.add_argument("--label-smoothing", type=float, default=0.1,
                   help="epsilon of conservative DPO, cdpo (default 0.1)")
    p.add_argument("--redo", action="store_true",
                   help="make again every stage whose recorded settings differ")
    p.add_argument("--model", help=HELP["model"] + preset("model"))
    p.add_argument("--pairs", help="train on your own preference pairs, a JSONL file of {prompt, "
                   "chosen, rejected} (or HH's {chosen, rejected}), from --model; offline runs "
                   "only")
    p.add_argument("--heldout", type=float, default=0.1,
                   help="with --pairs: the share of prompts held out for evaluation (default 0.1)")
    for k, v in PRESETS["tiny"].items():  # every preset value can be overridden: --dpo-steps 50
        if k != "data":
            p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None,
                           choices=CHOICES.get(k), help=HELP.get(k, "") + preset(k))
    return p


def get_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    args.preset = args.preset or ("imdb" if args.device.startswith("cuda") else "tiny")
    if args.pairs:  # your own pairs: a pretrained GPT-2 as pi_ref, fine-tuned as the paper does
        pairs_defaults(p, args)
        for k in ("sft_lr", "dpo_lr", "optimizer"):  # not the tiny preset's, made for a GPT from scratch
            setattr(args, k, PRESETS["imdb"][k] if getattr(args, k) is None else getattr(args, k))
    if args.model is not None and (args.init or PRESETS[args.preset]["init"]) == "scratch":
        p.error(f"--model {args.model}: the {args.preset} preset trains a GPT from scratch; add "
                f"--init pretrained")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = args.out or os.path.join("out", "pairs" if args.pairs else args.preset)
    args.tokenizer = None  # (name, words) the checkpoints record: the driver's, once it knows
    check_args(p, args)
    args.data_dir = args.data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "data", args.data)
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
        p.error("--impl triton: the Triton kernel needs --device cuda, or TRITON_INTERPRET=1 on a "
                "CPU (slow); --impl auto takes the reference there")
    if (args.init == "pretrained" and args.model not in GPT.SIZES
            and not os.path.isdir(args.model or "")):
        p.error(f"--model {args.model}: expected one of {', '.join(GPT.SIZES)} or a Hugging Face "
                f"folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: is a file; expected a run folder")
    if args.seed < 0:
        p.error(f"--seed {args.seed}: expected a whole number >= 0")
    if args.log_every < 1:
        p.error(f"--log-every {args.log_every}: expected a positive number")
    for k, v in PRESETS["tiny"].items():  # sizes, steps and rates: positive (warm-up may be 0)
        # with --pairs, no SFT (--sft-steps 0) takes --model itself as pi_ref
        zero_ok = k == "warmup" or k == "sft_steps" and args.pairs
        least = 0 if zero_ok else 1 if isinstance(v, int) else 1e-30
        if isinstance(v, (int, float)) and not getattr(args, k) >= least:
            p.error(f"--{k.replace('_', '-')}: expected a positive number, got {getattr(args, k)}")
    if args.init == "scratch" and args.n_embd % args.n_head:
        p.error(f"--n-head {args.n_head}: expected a divisor of --n-embd {args.n_embd}")
    if args.init == "pretrained" and args.model in GPT.SIZES and args.block_size > 1024:
        p.error(f"--block-size {args.block_size}: GPT-2 ({args.model}) has 1024 positions")
    # the classifier's crops take 16 tokens and more
    if args.block_size < max(18, args.max_new_tokens + 9):
        p.error(f"--block-size {args.block_size}: expected at least 18, and room for a prompt of "
                f"up to 8 tokens and --max-new-tokens {args.max_new_tokens}")
    if not all(n.strip().isdigit() and int(n) > 0 for n in args.best_of.split(",")):
        p.error(f"--best-of {args.best_of}: expected comma-separated positive whole numbers, e.g. "
                f"1,2,4,8,16")
    if not 0 <= args.label_smoothing < 0.5:
        p.error(f"--label-smoothing {args.label_smoothing}: expected a flip probability in "
                f"[0, 0.5)")
    try:
        args.run_list = parse_runs(args.runs)
    except ValueError as e:
        p.error(f"--runs: {e}")
    methods, world = {m for m, _ in args.run_list}, int(os.environ.get("WORLD_SIZE", 1))
    online, dpo_runs = methods & set(ONLINE), methods - set(ONLINE)
    if args.pairs and online:
        p.error(f"--runs: {', '.join(sorted(online))} sample as they train and need a reward; "
                f"--pairs trains the others")
    for k in ["batch"] + ["dpo_batch"] * bool(dpo_runs) + ["ppo_batch"] * bool(online):
        if getattr(args, k) < world:  # under torchrun each rank takes every world-th row of a batch
            p.error(f"--{k.replace('_', '-')} {getattr(args, k)}: fewer rows than the {world} "
                    f"torchrun processes")
    grouped = {m for m in online if not METHODS[m].value_head}  # rloo, grpo
    if grouped and (args.group < 2 or args.ppo_batch % args.group):
        p.error(f"--group {args.group}: rloo and grpo need at least 2 samples per prompt, and "
                f"--ppo-batch {args.ppo_batch} a multiple of it")
    # a rollout draws its prompts from the training prompts; each rank samples every world-th one
    for m in online:
        prompts = rollout_prompts(m, args)
        k = args.ppo_batch // prompts  # samples per prompt
        what = f"--ppo-batch {args.ppo_batch}" + f" / --group {args.group}" * (k > 1)
        if prompts < world:
            p.error(f"{what}: a rollout of {m} draws {prompts} prompts, fewer than the {world} "
                    f"torchrun processes")
        # the fewest samples a rank gets: whole groups of k
        if prompts // world * k < args.ppo_minibatches:
            share = (f" / {world} processes"
                     + f" (at least {prompts // world * k} samples each)" * (k > 1))
            p.error(f"--ppo-minibatches {args.ppo_minibatches} is more than --ppo-batch "
                    f"{args.ppo_batch}"
                    + share * (world > 1) + f": a minibatch of {m} would be empty")
        if prompts > args.n_prompts:
            p.error(f"{what} is more than --n-prompts {args.n_prompts}: a rollout of {m} draws "
                    f"{prompts} different training prompts")


def n_heldout(args):
    """How many test prompts after the --n-eval ones give PPO's reward model its held-out pairs."""
    return max(32, args.n_prompts // 10)


def check_data(args, data):
    """The sizes that depend on the data, checked before SFT: enough long reviews for the prompts
    asked for."""
    path = os.path.join(args.data_dir, f"{args.data}.npz")
    online = {m for m, _ in args.run_list} & set(ONLINE)
    usable = {s: int((data[s].chars > args.min_chars).sum()) for s in ("train", "test")}
    heldout = n_heldout(args) if any(METHODS[m].score == "rm" for m in online) else 0
    if args.n_eval + heldout > usable["test"]:
        extra = f" + {heldout} held-out prompts of PPO's reward model" if heldout else ""
        raise UsageError(f"--n-eval {args.n_eval}{extra}: the test split of {path} has "
                         f"{usable['test']} reviews longer than --min-chars {args.min_chars}")
    if args.init == "pretrained" and data["tokenizer"] != "gpt2":
        raise UsageError(f"--init pretrained: GPT-2's weights read GPT-2's BPE tokens, but {path} "
                         f"holds {data['tokenizer']} tokens; use --init scratch (or prepare the "
                         f"data with --tokenizer gpt2)")
    most = max((rollout_prompts(m, args) for m in online), default=0)
    if most > usable["train"]:
        raise UsageError(f"--ppo-batch {args.ppo_batch}: a rollout draws {most} prompts, but the "
                         f"train split of {path} has {usable['train']} reviews longer than "
                         f"--min-chars {args.min_chars} to cut prompts from")
