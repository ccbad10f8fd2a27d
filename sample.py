"""
Completions from a trained model: a run's policy, the reference pi_ref, any checkpoint, or a Hugging
Face folder.

    python sample.py out/tiny/runs/dpo_0.1 --prompt "The acting" --n 4   # a run's final policy
    python sample.py out/tiny/sft --prompt "The acting"                   # pi_ref, the SFT model
    python sample.py out/tiny/runs/dpo_0.1/ckpt.pt --prompts prompts.txt --temperature 0.7 --out
    samples.jsonl

Each prompt is laid out as sampling lays it out in the pipeline, common.layout(prompt, []) (the
beginning-of-text token, then the prompt), and answered --n times at --temperature (1, as in
evaluation, by default; 0 is greedy). Where the run folder holds the classifier (the ground truth r*
of the tiny and imdb experiments), each completion's reward r* = p(positive) is printed beside it.

A checkpoint written with model.model_record holds its GPTConfig and tokenizer. An older one holds
only the weights: its shape is read from them, its number of heads from the run folder's
settings.json, its tokenizer from its vocabulary size.
"""
import json
import os
import sys

import torch

import sampling
from data.corpus import OneLineParser, UsageError, load_checkpoint, write_atomic
from data.tiny.prepare import vocabulary
from hf import from_pretrained
from model import GPT, GPTConfig, get_tokenizer, model_from_record

CLASSIFIER = ("classifier", "reward")  # the folder of r* in a run folder (its older name second)


def find_root(path):
    """The run folder above a stage folder or checkpoint (out/tiny for
    out/tiny/runs/dpo_0.1/model.pt): the nearest folder holding settings.json, or None."""
    folder = os.path.abspath(path)
    folder = os.path.dirname(folder) if os.path.isfile(folder) else folder
    for _ in range(3):
        if os.path.exists(os.path.join(folder, "settings.json")):
            return folder
        folder = os.path.dirname(folder)
    return None


def checkpoint_of(path):
    """The checkpoint a path names: a file itself, or a stage folder's model.pt (its ckpt.pt while
    it trains)."""
    if os.path.isfile(path):
        return path
    for name in ("model.pt", "ckpt.pt"):
        if os.path.exists(os.path.join(path, name)):
            if name == "ckpt.pt":
                print(f"note: {path} is still training: its last checkpoint {name}", file=sys.stderr)
            return os.path.join(path, name)
    raise UsageError(f"{path}: no model.pt, ckpt.pt or config.json there; expected a stage folder "
                     f"(out/tiny/runs/dpo_0.1, out/tiny/sft), a checkpoint or a Hugging Face folder")


def load(path, device="cpu"):
    """(model in eval mode on device, tokenizer name, words) of a stage folder, checkpoint or
    Hugging Face folder."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or folder")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        model = from_pretrained(path)
        named = json.load(open(os.path.join(path, "config.json"))).get("nanodpo", {})
        return model.to(device).eval(), named.get("tokenizer", "gpt2"), named.get("words", [])
    ckpt = checkpoint_of(path)
    saved = load_checkpoint(ckpt)
    if "config" in saved:
        model, tokenizer, words = model_from_record(saved)
    else:
        model, tokenizer, words = from_weights(saved, ckpt)
    return model.to(device).eval(), tokenizer, words


def from_weights(saved, ckpt):
    """(model, tokenizer, words) of a checkpoint that holds only the weights (written before
    model_record)."""
    sd = saved["model"]
    settings_path = os.path.join(find_root(ckpt) or ".", "settings.json")
    if not os.path.exists(settings_path):
        raise UsageError(f"{ckpt} records no config, and no settings.json above it says its heads")
    sft = json.load(open(settings_path)).get("sft", {})
    if sft.get("init") == "pretrained":
        model = sft.get("model")
        n_head = GPT.SIZES[model]["n_head"] if model in GPT.SIZES else json.load(
            open(os.path.join(model, "config.json")))["n_head"]
    else:
        n_head = sft["n_head"]
    vocab, n_embd = sd["transformer.wte.weight"].shape
    n_layer = len({k.split(".")[2] for k in sd if k.startswith("transformer.h.")})
    config = GPTConfig(block_size=sd["transformer.wpe.weight"].shape[0], vocab_size=vocab, n_layer=n_layer,
                       n_head=n_head, n_embd=n_embd, score_head="score_head.weight" in sd)
    model = GPT(config)
    model.load_state_dict(sd)
    tiny = vocabulary()
    by_vocab = {50257: ("gpt2", []), 257: ("bytes", []), len(tiny) + 1: ("words", tiny)}
    if vocab not in by_vocab:
        raise UsageError(f"{ckpt}: a vocabulary of {vocab} is none of nanoDPO's tokenizers "
                         f"(gpt2 50257, bytes 257, tiny's words {len(tiny) + 1})")
    return (model, *by_vocab[vocab])


def classifier_of(root, device):
    """The run folder's r* (its classifier's model, calibrated as the pipeline scores with it), or
    None where it has none."""
    for name in CLASSIFIER if root else ():
        folder = os.path.join(root, name)
        if os.path.exists(os.path.join(folder, "model.pt")):
            model = load(folder, device)[0]
            if not os.path.exists(os.path.join(folder, "calibration.json")):
                return model  # an older nanoDPO's r*, not calibrated
            return sampling.calibrated(model, folder)
    return None


def read_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompts {args.prompts}: {type(e).__name__}; expected a UTF-8 file, "
                             f"one prompt a line") from None
    if not prompts:
        raise UsageError("no prompt: give --prompt \"...\" (repeatable) or --prompts FILE")
    return prompts


def main(argv=None):
    p = OneLineParser(description="Completions from a trained model (a run, pi_ref, a checkpoint)")
    p.add_argument("model", help="a stage folder (out/tiny/runs/dpo_0.1, out/tiny/sft), "
                                 "a checkpoint .pt, or a Hugging Face folder")
    p.add_argument("--prompt", action="append", help="a prompt; repeat it for more")
    p.add_argument("--prompts", help="a UTF-8 file of prompts, one a line")
    p.add_argument("--n", type=int, default=4, help="completions per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1)")
    p.add_argument("--max-new-tokens", type=int, help="longest completion (default: the run's, else 64)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the draws (default 1337)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default cuda where torch sees a GPU)")
    p.add_argument("--out", help="also write the completions to this JSONL file")
    args = p.parse_args(argv)
    if args.n < 1 or args.temperature < 0 or args.seed < 0 or (args.max_new_tokens or 1) < 1:
        p.error("--n, --max-new-tokens: expected positive numbers; --temperature, --seed: >= 0")
    prompts = read_prompts(args)
    model, tokenizer, words = load(args.model, args.device)
    enc = get_tokenizer(tokenizer, words)
    hf = os.path.exists(os.path.join(args.model, "config.json"))
    root = None if hf else find_root(args.model)  # the run folder: its settings, its r*
    recorded = json.load(open(os.path.join(root, "settings.json"))) if root else {}
    run_new = [s["max_new_tokens"] for s in recorded.values() if "max_new_tokens" in s]
    new = args.max_new_tokens or (run_new + [64])[0]
    try:
        ids = [enc.encode_ordinary(t) for t in prompts]
    except ValueError as e:
        raise UsageError(f"a prompt: {e}") from None
    block = model.config.block_size
    for t, x in zip(prompts, ids):
        if 1 + len(x) + new > block:
            raise UsageError(f"the prompt {t[:40]!r} ({len(x)} tokens) + --max-new-tokens {new} + its "
                             f"beginning-of-text token exceed the model's block size {block}")
    many = [x for x in ids for _ in range(args.n)]
    eos = enc.eot_token
    completions = sampling.sample(model, many, new, eos, args.seed, args.device, args.temperature)
    rm = classifier_of(root, args.device)
    if rm is not None:
        rewards = sampling.reward(rm, many, completions, eos, rm.config.block_size,
                                  args.device).tolist()
    records = []
    for i, y in enumerate(completions):
        text = enc.decode([t for t in y if t != eos])
        records.append(dict(prompt=prompts[i // args.n], completion=text, ended=y[-1:] == [eos],
                            **({"reward": rewards[i]} if rm is not None else {})))
        if i % args.n == 0:
            print(f"--- {prompts[i // args.n]!r}")
        print((f"[r* {rewards[i]:.3f}] " if rm is not None else "") + text)
    if rm is None:
        print("(no classifier r* in this folder's run: no rewards)", file=sys.stderr)
    if args.out:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        write_atomic(args.out, lambda f: f.write(lines.encode()))
    return records


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"nanoDPO: error: {e}")
