"""
The experiment, stage by stage (the numbering of common.py): the data, pi_ref, r*, the pairs and
Best-of-N (stages.py), then every run of --runs on the same axes, DPO's family (dpo.py) and the
online methods (ppo.py, on the scores of scores.py), then the figure (plots/frontier.py). `python
dpo.py` runs it (cli). Every stage writes under --out with the settings it was made with
(record.py); a rerun skips what is complete. With --pairs FILE.jsonl (pairs_experiment) the
pairs are yours and pi_ref is --model: no r*, so no frontier; each run's curves are the figure.
"""
import copy
import os
import sys
import time
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

import dpo
import ppo
import stages
from calibration import calibration_reviews, check_held_out, exact_truth
from common import amp, barrier, fit, is_main, log, pack, rank_world, setup_distributed
from data.pairs import batch_rows, file_digest, load_pairs, read_pairs
from errors import UsageError
from methods import METHODS, run_folder
from model import get_tokenizer
from plots.curves import plot_curves
from plots.frontier import plot_frontier
from record import check_settings, data_digest, locked, stage_plan
from scores import score_functions
from settings import check_data, get_args, n_heldout


def main(argv=None):
    args = get_args(argv)
    args.device = setup_distributed(args.device)
    if args.pairs:
        records = read_pairs(args.pairs)  # every bad record, before any work
        log(f"nanoDPO: the pairs of {args.pairs}, from {args.model}, preset {args.preset} on "
            f"{args.device} -> {args.out}")
        with locked(args.out):
            pairs_experiment(args, records)
        return end()
    log(f"nanoDPO: preset {args.preset} on {args.device} -> {args.out}")
    data = stages.load_data(args.data_dir, args.data)  # 1. data
    check_data(args, data)
    train = data["train"]  # and the reviews r* will calibrate on, before any work
    check_held_out(train.labels, len(train) - calibration_reviews(train),
                   os.path.join(args.data_dir, f"{args.data}.npz"))
    args.tokenizer = (data["tokenizer"], data["words"])  # what the checkpoints record
    with locked(args.out):  # one command at a time in a run folder
        experiment(args, data)
    end()


def experiment(args, data):
    """Stages 2-7 into args.out, which main holds locked."""
    # reused only if the settings match
    check_settings(args.out, stage_plan(args, data_digest(data)), args.redo)
    t_start = time.time()
    enc = get_tokenizer(data["tokenizer"], data["words"])
    eos, vocab = enc.eot_token, enc.n_vocab
    rng = np.random.default_rng(args.seed)
    train_prompts = stages.make_prompts(data["train"], args.n_prompts, args.min_chars, rng)
    n_test = args.n_eval + n_heldout(args)
    test_prompts = stages.make_prompts(data["test"], n_test, args.min_chars, rng)
    eval_prompts, heldout_prompts = test_prompts[:args.n_eval], test_prompts[args.n_eval:]

    sft = stages.sft(args, data, eos, vocab)  # 2. the reference
    classifier = stages.classifier(args, data, eos, vocab, sft)  # 3. the ground-truth reward r*
    truth = exact_truth(data)  # tiny's exact P(label | text), to check r* by (None: imdb)
    # 4. the preference pairs
    pairs = stages.make_pairs(sft, classifier, train_prompts, args, eos, truth=truth)
    stages.best_of_n(sft, classifier, eval_prompts, args, eos, truth)
    ref = copy.deepcopy(sft).eval().requires_grad_(False)
    # 6. every run is evaluated the same way; each starts as pi_ref, whose evaluation is its first
    evaluate = partial(stages.evaluate, ref=ref, classifier=classifier, prompts=eval_prompts,
                       eos=eos, seed=args.seed, max_new_tokens=args.max_new_tokens,
                       block_size=args.block_size, device=args.device, impl=args.impl,
                       decode=enc.decode, truth=truth)
    todo = [run for run in args.run_list
            if not os.path.exists(os.path.join(args.out, run_folder(*run), "model.pt"))]
    at_start = evaluate(ref) if todo else None

    scores = {METHODS[m].score for m, _ in args.run_list} - {None}  # what the online runs train on
    # the reward model learns from the same pairs, validated on pairs of held-out prompts
    if scores:
        heldout = None
        if "rm" in scores:
            heldout = stages.make_pairs(sft, classifier, heldout_prompts, args, eos,
                                        name="pairs_heldout.pt")
        score_fns = score_functions(sft, classifier, pairs, heldout, train_prompts, args, eos,
                                    scores)
    for method, param in args.run_list:  # 5. and 6. every run
        if METHODS[method].score:
            score_fn = score_fns[METHODS[method].score]
            ppo.run(method, param, sft, ref, score_fn, train_prompts, evaluate, at_start, args, eos)
        else:
            dpo.run(method, param, sft, ref, pairs, evaluate, at_start, args, eos)
    if is_main():  # 7. the figure of this command's runs
        names = [os.path.basename(run_folder(m, p)) for m, p in args.run_list]
        figure = args.figure or os.path.join(args.out, "frontier.png")
        log(f"wrote {plot_frontier(args.out, figure, names)}")
        plot_runs(args)
    log(f"nanoDPO: done in {time.time() - t_start:.0f}s")


def pairs_experiment(args, records):
    """--pairs: the file's pairs (records: read_pairs's) in GPT-2's BPE, a share of the prompts held
    out; pi_ref = --model, or fine-tuned on the training pairs' chosen responses; then every run,
    evaluated on the held-out pairs and prompts (evaluate_pairs); then their curves."""
    check_settings(args.out, stage_plan(args, file_digest(args.pairs)), args.redo)
    t_start = time.time()
    args.tokenizer = ("gpt2", [])
    enc = get_tokenizer("gpt2")
    eos = enc.eot_token
    train, heldout, _ = load_pairs(args.pairs, enc, args.block_size, args.heldout, args.seed, log=log,
                                   read=records)
    model = stages.make_model(args, enc.n_vocab)
    if model.config.vocab_size != enc.n_vocab:
        raise UsageError(f"--model {args.model}: a vocabulary of {model.config.vocab_size} tokens; "
                         f"--pairs tokenises with GPT-2's BPE, {enc.n_vocab}")
    sft = sft_on_pairs(args, model, train, eos)  # pi_ref
    ref = copy.deepcopy(sft).eval().requires_grad_(False)
    # the first --n-eval held-out pairs, and their prompts, each cut (its end kept) to leave room
    # for --max-new-tokens after the beginning-of-text token
    pairs = {k: v[:args.n_eval] for k, v in heldout.items()}
    room = args.block_size - 1 - args.max_new_tokens
    distinct = dict.fromkeys(map(tuple, pairs["prompt"]))
    prompts = [list(p[len(p) - min(len(p), room):]) for p in distinct]
    for method, param in args.run_list:  # 5. and 6. every run
        evaluate = partial(evaluate_pairs, ref=ref, pairs=pairs, prompts=prompts, method=method,
                           param=param, label_smoothing=args.label_smoothing, eos=eos, seed=args.seed,
                           max_new_tokens=args.max_new_tokens, block_size=args.block_size,
                           device=args.device, impl=args.impl, decode=enc.decode)
        done = os.path.exists(os.path.join(args.out, run_folder(method, param), "model.pt"))
        dpo.run(method, param, sft, ref, train, evaluate, None if done else evaluate(ref), args, eos)
    if is_main():
        log("no frontier figure: it needs the ground-truth reward r*, which your pairs do not have")
        plot_runs(args)
    log(f"nanoDPO: done in {time.time() - t_start:.0f}s")


# ------------------------------------------------------------ --pairs: pi_ref and evaluation
class ChosenBatches(NamedTuple):
    """batches(step): this rank's share of `batch` training pairs drawn by (seed, step), each laid
    out as common.layout(prompt, chosen): the chosen responses' NLL, the paper's Preferred-FT SFT of
    pi_ref. Returns idx, targets, mask (B, T)."""
    pairs: dict
    batch: int
    block_size: int
    eos: int
    seed: int

    def __call__(self, step):
        rank, world = rank_world()
        rows = batch_rows(self.pairs, self.batch, self.seed, step)[rank::world]
        return pack([self.pairs["prompt"][i] for i in rows],
                    [self.pairs["chosen"][i] for i in rows], self.block_size, self.eos)


def sft_on_pairs(args, model, pairs, eos):
    """pi_ref with --pairs: --model as it is (--sft-steps 0), or fine-tuned for --sft-steps on the
    chosen responses of the training pairs (out/sft)."""
    if args.sft_steps == 0:
        return model
    batches = ChosenBatches(pairs, args.batch, args.block_size, eos, args.seed)
    loss = partial(stages.sft_loss, impl=args.impl)
    return fit("sft", model, loss, batches, args.sft_steps, args.sft_lr, args)


@torch.no_grad()
def heldout_metrics(policy, ref, pairs, method, param, *, label_smoothing, eos, block_size,
                    device, impl, chunk=64):
    """dpo.pair_loss of a run's method on held-out pairs, the policy in eval mode: the loss and the
    implicit rewards, their margin and accuracy, the log-probs, each the mean over the pairs. ft
    and ul have no implicit reward of their own: theirs are read as DPO's at beta 1, log(pi /
    pi_ref), without a loss."""
    own = method not in ("ft", "ul")
    method, param = (method, param) if own else ("dpo", 1.0)
    training, sums, n = policy.training, {}, len(pairs["prompt"])
    policy.eval()
    for i in range(0, n, chunk):
        p, c, r = (pairs[k][i:i + chunk] for k in ("prompt", "chosen", "rejected"))
        # KTO: and each prompt with the next pair's chosen response (pair_batch's mismatched rows)
        batch = dpo.pack_pairs(p, c, r, block_size, eos, c[1:] + c[:1] if method == "kto" else None)
        with amp(device):
            loss, metrics = dpo.pair_loss(policy, [x.to(device) for x in batch], ref, method, param,
                                          impl, label_smoothing)
        for k, v in ((dict(loss=loss.item()) if own else {}) | metrics).items():
            sums[k] = sums.get(k, 0.0) + v * len(p)
    policy.train(training)
    return {k: v / n for k, v in sums.items()}


def evaluate_pairs(policy, ref, pairs, prompts, method, param, *, label_smoothing, **sampling):
    """A run's evaluation with --pairs: heldout_metrics on the held-out pairs, then evaluate's exact
    KL and samples on held-out prompts, no r*."""
    shared = {k: sampling[k] for k in ("eos", "block_size", "device", "impl")}
    metrics = heldout_metrics(policy, ref, pairs, method, param, label_smoothing=label_smoothing,
                              **shared)
    return metrics | stages.evaluate(policy, ref, None, prompts, **sampling)


def plot_runs(args):
    """Each run's training curves (plots/curves.py), runs/<run>/curves.png; rank 0 draws."""
    for method, param in args.run_list:
        run = os.path.join(args.out, run_folder(method, param))
        if os.path.exists(os.path.join(run, "metrics.jsonl")):  # an older nanoDPO's run has none
            log(f"wrote {plot_curves(run)}")


def end():
    barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def cli():
    """python dpo.py: a user's mistake (bad data, a stale stage) is one line, no traceback."""
    try:
        main()
    except UsageError as e:  # a bad pairs file: a line per bad record
        sys.exit("\n".join(f"nanoDPO: error: {line}" for line in str(e).splitlines()))
