"""
The record of the settings each stage under --out was made with (settings.json), so that a stage is
reused only when they match; the data's identity in that record; the lock of a run folder.
"""
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager

import numpy as np
import torch

from calibration import CALIBRATION_REVIEWS
from common import log, rank_world
from data.corpus import write_atomic
from errors import UsageError
from methods import METHODS, ONLINE, run_folder


def stage_plan(args, data_sha256):
    """{output under --out: the settings it depends on, those of the stages it is built from
    included}, in pipeline order, for the stages this command needs. A changed upstream setting so
    changes every stage after it too. data_sha256 (data_digest; --pairs: the file's) names the data
    by its content."""
    pick = lambda *keys: {k: getattr(args, k) for k in keys}
    if args.pairs:
        return pairs_plan(args, data_sha256, pick)
    sft = pick("data", "init", "n_layer", "n_head", "n_embd", "block_size", "batch", "warmup",
               "seed", "sft_steps", "sft_lr")
    sft |= {"model": args.model if args.init == "pretrained" else None, "data_sha256": data_sha256}
    # its crops cover the scored length; it is calibrated on the last training reviews
    classifier = sft | pick("classifier_steps", "classifier_lr", "max_new_tokens")
    classifier |= {"calibration_reviews": CALIBRATION_REVIEWS}
    pairs = classifier | pick("n_prompts", "min_chars")
    prompts = pairs | pick("n_eval")  # the held-out prompts are drawn after the training prompts
    plan = {"sft": sft, "classifier": classifier, "pairs.pt": pairs,
            "best_of_n.jsonl": prompts | pick("best_of")}
    methods = {m for m, _ in args.run_list}
    scores = {METHODS[m].score for m in methods & set(ONLINE)}
    if "rm" in scores:
        plan["pairs_heldout.pt"] = prompts
        plan["reward_model"] = prompts | pick("bt_steps", "bt_lr", "eval_every")
    for s in sorted(scores):
        plan[f"score_norm_{s}.json"] = plan["reward_model" if s == "rm" else "pairs.pt"]
    for method, param in args.run_list:
        if method in ONLINE:
            plan[run_folder(method, param)] = (
                prompts | plan[f"score_norm_{METHODS[method].score}.json"]
                | pick("optimizer", "ppo_iters", "ppo_batch", "ppo_epochs", "ppo_minibatches",
                       "ppo_lr", "ppo_eval_every",
                       *(("kl_horizon",) if METHODS[method].value_head else ("group",))))
        else:
            extra = pick("label_smoothing") if method == "cdpo" else {}
            plan[run_folder(method, param)] = prompts | pick(
                "dpo_steps", "dpo_lr", "dpo_batch", "optimizer", "eval_every") | extra
    return plan


def pairs_plan(args, pairs_sha256, pick):
    """stage_plan with --pairs: pi_ref (sft, none with --sft-steps 0) from --model, then each
    run."""
    sft = pick("model", "block_size", "heldout", "seed", "sft_steps", "sft_lr", "batch", "warmup")
    plan = {"sft": sft | {"pairs_sha256": pairs_sha256}}
    for method, param in args.run_list:
        plan[run_folder(method, param)] = plan["sft"] | pick(
            "n_eval", "max_new_tokens", "dpo_steps", "dpo_lr", "dpo_batch", "optimizer",
            "eval_every", *["label_smoothing"] * (method == "cdpo"))
    return plan


def check_settings(out, plan, redo):
    """Compare each stage's settings with those recorded in out/settings.json when it was made. A
    stage made with other settings (or by an older nanoDPO that kept no record) is refused with one
    line, or with redo deleted so that it is made again; then the plan is recorded. Rank 0
    checks."""
    on_rank0(lambda: _check_settings(out, plan, redo))


def on_rank0(fn):
    """fn() on rank 0 only; a UsageError it raises is raised on every rank of torchrun, so that all
    stop together."""
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
                raise UsageError(f"{path} is not JSON ({e.msg}, line {e.lineno}); fix it, or "
                                 f"delete it and add --redo to make every stage again") from None
    for stage, settings in plan.items():
        target = os.path.join(out, stage)
        if not os.path.exists(target) or recorded.get(stage) == settings:
            continue
        old = recorded.get(stage, {})
        diff = ", ".join(f"{k} {old.get(k, 'unset')} -> {v}" for k, v in settings.items()
                         if old.get(k, "unset") != v)
        why = (f"was made with other settings ({diff})" if stage in recorded
               else "has no record of its settings")
        if not redo:
            raise UsageError(f"{target} {why}: use another --out, or --redo to make it and every "
                             f"stage after it again")
        log(f"[redo] {target} {why}: making it again")
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    write_atomic(path, lambda f: f.write(json.dumps(recorded | plan, indent=1).encode()))


@contextmanager
def locked(out):
    """Hold out/.lock while a command uses the run folder: a second command into it stops in one
    line, instead of doubling its records and overwriting its checkpoints. The system drops an flock
    when its process dies, so a killed command leaves no stale lock. Rank 0 holds it for all of a
    torchrun."""
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
            raise UsageError(f"{out} is in use by another command (process {holder}); wait for "
                             f"it, or use another --out") from None
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


def data_digest(data):
    """sha256 of a corpus's tokenizer (and word list), tokens, labels and lengths: the data's
    identity in the settings record (the .npz file's own bytes also hold the times its members
    were written)."""
    h = hashlib.sha256("\n".join([data["tokenizer"], *data["words"]]).encode())
    for s in ("train", "test"):
        for a in (data[s].tokens, data[s].offsets, data[s].labels, data[s].chars):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
