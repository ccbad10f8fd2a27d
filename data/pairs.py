"""
Your own preference pairs: a JSONL file, one record a line, in either of the two styles people write
them.

    {"prompt": "...", "chosen": "...", "rejected": "..."}   the prompt apart (TRL's style)
    {"chosen": "<prompt>...", "rejected": "<prompt>..."}    the prompt inside both (Anthropic's HH)

In the second style the prompt is the texts' common beginning, cut at a boundary (cut_prompt). Every
line is checked before any work, and the bad ones stop it, one line each naming the file and the
line. The records are then tokenised into the structure stages.make_pairs makes, dict(prompt=[ids],
chosen=[ids], rejected=[ids]), in common.layout: [BOS] + prompt + response, prompt and response
tokenised apart.

    python data/pairs.py FILE.jsonl    # check a file: its style, its pairs, the block size's cuts
"""
import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.corpus import OneLineParser, UsageError  # noqa: E402
from model import GPT, get_tokenizer  # noqa: E402

ASSISTANT = "\n\nAssistant:"  # HH's turn marker: its last one in the common prefix ends the prompt


def read_pairs(path):
    """[(line number, prompt, chosen response, rejected response)] of the text records of a pairs
    file, and the style found: 'prompt' (a "prompt" key) or 'joined' (the prompt inside chosen and
    rejected), that of its first record. A file holds one style. UsageError naming every bad line,
    one line each: not UTF-8, not a JSON object, a key missing, a value not a non-empty string,
    chosen identical to rejected, or an empty response once the prompt is taken off."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file; expected a JSONL file of "
                         f"{{prompt, chosen, rejected}} records")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records, bad, first = [], [], None  # first: (line, style) of the first JSON object
    for n, raw in enumerate(lines, 1):
        try:
            rec = parse_line(raw)
            if rec is None:
                continue
            first = first or (n, "prompt" if "prompt" in rec else "joined")
            records.append((n, *check_record(rec, *first)))
        except UsageError as e:
            bad.append(f"{path}, line {n}: {e}")
    if bad:
        raise UsageError("\n".join(bad))
    if not records:
        raise UsageError(f"{path}: no records; expected one JSON object a line")
    return records, first[1]


def parse_line(raw):
    """The JSON object of a line's bytes, or None for a blank line; UsageError saying what is
    wrong."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"not UTF-8 (byte {e.start + 1} of the line); save the file as "
                         f"UTF-8") from None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"not a JSON record ({e.msg}, column {e.colno})") from None
    if not isinstance(rec, dict):
        raise UsageError(f"expected a JSON object with chosen and rejected, got {type(rec).__name__}")
    return rec


def check_record(rec, first_line, style):
    """(prompt, chosen, rejected) of a record in a file of `style` (that of its first record, on
    first_line); UsageError saying what is wrong."""
    if ("prompt" in rec) != (style == "prompt"):  # a record without its prompt is a key missing
        no, has = ("no", "has one") if style == "prompt" else ("a", "has none")
        raise UsageError(f"{no} \"prompt\" key, but line {first_line} {has}: one file holds one "
                         f"style of record")
    keys = ("prompt", "chosen", "rejected") if style == "prompt" else ("chosen", "rejected")
    for k in keys:
        if k not in rec:
            raise UsageError(f"no {k!r} key; expected {', '.join(keys)}")
        if not isinstance(rec[k], str):
            raise UsageError(f"{k!r} is a {type(rec[k]).__name__}; expected a string")
        if k != "prompt" and not rec[k]:  # an empty prompt is allowed: the response starts the text
            raise UsageError(f"{k!r} is empty")
    if rec["chosen"] == rec["rejected"]:
        raise UsageError("chosen and rejected are the same text: a pair must differ")
    if style == "prompt":
        prompt, chosen, rejected = rec["prompt"], rec["chosen"], rec["rejected"]
    else:
        prompt, chosen, rejected = split_joined(rec["chosen"], rec["rejected"])
    for k, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise UsageError(f"the {k} response is empty once the common prompt {prompt[-40:]!r} "
                             f"is taken off")
    return prompt, chosen, rejected


def split_joined(chosen, rejected):
    """(prompt, chosen response, rejected response) of two texts that share their beginning
    (cut_prompt)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = cut_prompt(chosen[:n])
    return chosen[:cut], chosen[cut:], rejected[cut:]


def cut_prompt(common):
    """Where the prompt ends in the common beginning of two texts: after its last HH turn marker
    "\\n\\nAssistant:" where there is one (both answers may start with the same words: those belong
    to the answers); else before its last whitespace, so that a response starts with its space, as
    GPT-2's BPE tokens do ("The movie was" + " great"); else at 0 (the whole texts are the
    responses)."""
    i = common.rfind(ASSISTANT)
    if i >= 0:
        return i + len(ASSISTANT)
    spaces = [j for j, c in enumerate(common) if c.isspace()]
    return spaces[-1] if spaces else 0


def tokenize(records, enc, block_size, path="pairs"):
    """The records as token ids, dict(prompt=[ids], chosen=[ids], rejected=[ids]), and the cut
    counts.

    A response here is a finished text (a person or a model wrote it to the end), so it ends with
    EOS: the policy learns where an answer stops, as SFT learns review + [EOS]. Only a response cut
    at the block size has not ended where the model sees it, and it gets no EOS it never had: the
    rule of results/tiny.md ("Truncated responses") for samples cut at --max-new-tokens. So that
    [BOS] + prompt + response fits block_size, the prompt gives up its beginning first (its end,
    next to the response, is kept), down to half the room; then both responses keep their starts in
    what is left. A pair whose two responses are the same once cut teaches nothing: it is dropped
    and counted."""
    room = block_size - 1  # after the BOS
    if room < 2:
        raise UsageError(f"block size {block_size}: too small for a BOS, a prompt token and a "
                         f"response token")
    eos = enc.eot_token
    texts = [t for _, *rec in records for t in rec]
    try:
        ids = enc.encode_ordinary_batch(texts)
    except ValueError:  # a words tokenizer names the word; find its record
        for n, *rec in records:
            for t in rec:
                try:
                    enc.encode_ordinary(t)
                except ValueError as e:
                    raise UsageError(f"{path}, line {n}: {e}") from None
        raise
    pairs, cut_prompts, cut_responses, dropped = dict(prompt=[], chosen=[], rejected=[]), 0, 0, 0
    for i in range(len(records)):
        p, c, r = ids[3 * i], ids[3 * i + 1] + [eos], ids[3 * i + 2] + [eos]
        longest = max(len(c), len(r))
        keep = min(len(p), max(room // 2, room - longest))
        cut_prompts += keep < len(p)
        p = p[len(p) - keep:]
        cut_responses += (len(c) > room - keep) + (len(r) > room - keep)
        c, r = c[:room - keep], r[:room - keep]
        if c == r:
            dropped += 1
            continue
        pairs["prompt"].append(p)
        pairs["chosen"].append(c)
        pairs["rejected"].append(r)
    return pairs, dict(cut_prompts=cut_prompts, cut_responses=cut_responses, dropped=dropped)


def file_digest(path):
    """sha256 of a file's bytes: a pairs file's identity in the settings record."""
    h = hashlib.sha256()
    with open(path, "rb") as f:  # in blocks (hashlib.file_digest needs Python 3.11)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def batch_rows(pairs, batch, seed, step):
    """The pairs of step's batch, `batch` row indices drawn by (seed, step): the same on every rank
    (each takes its share [rank::world]) and again after a resume. DPO's loop, the reward model
    and --pairs' SFT draw their batches of pairs this one way."""
    return np.random.default_rng([seed, step]).integers(len(pairs["prompt"]), size=batch)


def split_heldout(pairs, share, seed):
    """(train, held-out) pairs: a share of the distinct prompts, drawn with seed, and every pair of
    theirs held out, so that no held-out prompt is seen in training. The same file, share and seed
    give the same split. pairs: columns of one length, "prompt" among them (token lists or
    texts)."""
    if not 0 <= share < 1:
        raise UsageError(f"held-out share {share}: expected a fraction in [0, 1)")
    key = [p if isinstance(p, str) else tuple(p) for p in pairs["prompt"]]
    prompts = list(dict.fromkeys(key))  # distinct, in order of appearance
    n_held = int(round(share * len(prompts)))
    if share > 0 and not 1 <= n_held < len(prompts):
        raise UsageError(f"held-out share {share} of {len(prompts)} distinct prompts leaves "
                         f"{'no held-out' if n_held < 1 else 'no training'} prompt; "
                         f"give more pairs or another share")
    held = {prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))[:n_held]}
    out = [{k: [] for k in pairs} for _ in range(2)]
    for i, p in enumerate(key):
        side = out[p in held]
        for k in side:
            side[k].append(pairs[k][i])
    return out[0], out[1]


def pairs_defaults(p, args):
    """The settings dpo.py --pairs implies (settings.get_args; p its parser): pi_ref is --model, a
    pretrained GPT-2 whose positions are the block size unless given; one DPO run unless --runs
    names others (offline ones: settings.check_args)."""
    if args.model is None:
        p.error(f"--pairs {args.pairs}: give --model, the GPT-2 to start from")
    path = os.path.join(args.model, "config.json")
    try:
        if args.model in GPT.SIZES:
            n = 1024
        else:
            with open(path) as f:
                n = int(json.load(f)["n_positions"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        p.error(f"--pairs: --model {args.model}: expected gpt2, gpt2-medium, gpt2-large, gpt2-xl or a "
                f"Hugging Face GPT-2 folder (no n_positions in {path}: {type(e).__name__})")
    if args.init == "scratch" or not 0 < args.heldout < 1 or (args.block_size or n) > n:
        p.error(f"--pairs: expected no --init scratch, --heldout {args.heldout} in (0, 1) and "
                f"--block-size {args.block_size or n} at most the {n} positions of --model {args.model}")
    args.init, args.runs, args.block_size = "pretrained", args.runs or "dpo:0.1", args.block_size or n


def load_pairs(path, enc, block_size, heldout=0.1, seed=0, log=print, read=None):
    """A pairs file checked, tokenised with enc and split: (train pairs, held-out pairs, info), both
    pairs in stages.make_pairs's structure; info holds the style, the counts and the cuts, also
    logged in a line. A command calls read_pairs(path) first, before any long work (a download, a
    model), to stop early on a bad record, and hands its result here as `read`."""
    records, style = read or read_pairs(path)
    # split by the prompt's text: the cut to the block size may give one prompt two token lists
    by_text = split_heldout(dict(prompt=[r[1] for r in records], record=records), heldout, seed)
    (train, cuts), (held, held_cuts) = (tokenize(side["record"], enc, block_size, path)
                                        for side in by_text)
    cuts = {k: n + held_cuts[k] for k, n in cuts.items()}
    if not train["prompt"] or heldout > 0 and not held["prompt"]:
        raise UsageError(f"{path}: no {'training' if not train['prompt'] else 'held-out'} pair left "
                         f"once the pairs the same after the cut to block size {block_size} are "
                         f"dropped; give more pairs or a larger --block-size")
    info = dict(style=style, pairs=len(records), train=len(train["prompt"]),
                heldout=len(held["prompt"]), **cuts)
    what = "a \"prompt\" key" if style == "prompt" else "the prompt inside both (HH style)"
    log(f"[pairs] {path}: {len(records)} pairs, {what}; {info['train']} to train on, "
        f"{info['heldout']} held out; cut to block size {block_size}: {cuts['cut_prompts']} prompts "
        f"(their beginning), {cuts['cut_responses']} responses (their end), "
        f"{cuts['dropped']} pairs dropped (the same once cut)")
    return train, held, info


def main(argv=None):
    p = OneLineParser(description="Check a pairs file: its style, its pairs, the block size's cuts")
    p.add_argument("path", help="JSONL of {prompt, chosen, rejected}, or HH's {chosen, rejected}")
    p.add_argument("--block-size", type=int, default=1024, help="longest sequence (default 1024)")
    p.add_argument("--heldout", type=float, default=0.1, help="prompts held out (default 0.1)")
    args = p.parse_args(argv)
    read_pairs(args.path)  # the file's mistakes first, before fetching the tokenizer
    load_pairs(args.path, get_tokenizer("gpt2"), args.block_size, args.heldout)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:  # a line per bad record
        sys.exit("\n".join(f"nanoDPO: error: {line}" for line in str(e).splitlines()))
