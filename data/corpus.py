"""
The format every data set is prepared into: labelled reviews, tokenised, in one .npz per data set.

    <name>.npz   for each split s in (train, test):
                 s_tokens  uint16 (total tokens,)  every review's token ids, one after another
                 s_offsets int64  (reviews + 1,)   review i is
                                                   s_tokens[s_offsets[i]:s_offsets[i + 1]]
                 s_labels  uint8  (reviews,)       1 = positive, 0 = negative
                 s_chars   int32  (reviews,)       length of the review text in characters
                 tokenizer                the name for model.get_tokenizer: gpt2, bytes or words
                 words     str    (vocabulary,)    the word list of a 'words' tokenizer (empty
                                                   otherwise)
    meta.json    the tokenizer's name and the counts, for people
and the checkpoints of dpo.py's stages: torch.save, written atomically, read without unpickling
code.
"""
import argparse
import json
import os
import sys
import uuid
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """A mistake on the command line is one line (argparse would print the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every setting)\n")


@dataclass
class Split:
    tokens: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    chars: np.ndarray

    def __len__(self):
        return len(self.labels)

    def review(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]].astype(np.int64)


def write_atomic(path, write):
    """write(f) into a temporary file beside path, then rename: a crash never leaves a half-written
    file under path, and processes writing one path at once each rename a whole file (the last one
    wins). The folder is made if it does not exist yet."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # a name of its own (mkstemp's would be private to the owner)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_jsonl(path):
    """The records of a .jsonl file. A torn last line (a kill during its write) is dropped with a
    warning; any other line that is not JSON is an error that names the file and the line."""
    with open(path) as f:
        lines = f.readlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not line.endswith("\n"):
                print(f"warning: {path}: dropped its torn last line {i + 1} (an interrupted write)",
                      file=sys.stderr)
                break
            raise UsageError(f"{path}, line {i + 1}: not a JSON record ({e.msg}); fix or delete "
                             f"that line") from None
    return records


def append_jsonl(path, records):
    """Append records to a .jsonl file, one JSON object a line."""
    if records:
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))


def save_checkpoint(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); delete "
                         f"it to redo that stage") from e


def save_corpus(out_dir, name, splits, enc, tokenizer, source=""):
    """splits: {'train': (texts, labels), 'test': (texts, labels)}; enc: a tiktoken Encoding or a
    WordTokenizer; source: what made the texts, for a generator (tiny) to know its own corpus by."""
    # without its <|endoftext|>, which it adds itself
    words = enc.words[:-1] if tokenizer == "words" else []
    arrays, meta = ({"tokenizer": np.array(tokenizer), "words": np.array(words, dtype=str),
                     "source": np.array(source)}, {"tokenizer": tokenizer})
    for split, (texts, labels) in splits.items():
        ids = enc.encode_ordinary_batch(list(texts))
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        arrays[f"{split}_tokens"] = np.concatenate([np.asarray(x, dtype=np.uint16) for x in ids]
                                                   + [np.zeros(0, np.uint16)])
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum(lengths)])
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.uint8)
        arrays[f"{split}_chars"] = np.array([len(t) for t in texts], dtype=np.int32)
        meta[split] = {"reviews": len(texts), "positive": int(np.sum(labels)),
                       "tokens": int(lengths.sum()),
                       "mean_tokens": round(float(lengths.mean()), 1) if len(texts) else 0}
    write_atomic(os.path.join(out_dir, f"{name}.npz"), lambda f: np.savez(f, **arrays))
    write_atomic(os.path.join(out_dir, "meta.json"),
                 lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def load_corpus(path):
    """{'train': Split, 'test': Split, 'tokenizer': name, 'words': a words tokenizer's list (else
    empty), 'source': save_corpus's} from a prepared .npz; a clear error when it is broken."""
    if not os.path.exists(path):
        name, folder = os.path.splitext(os.path.basename(path))[0], os.path.dirname(path) or "."
        raise UsageError(f"{path} does not exist: run python data/{name}/prepare.py --out {folder}")
    try:
        with np.load(path) as z:
            splits = {s: Split(*(z[f"{s}_{k}"] for k in ("tokens", "offsets", "labels", "chars")))
                      for s in ("train", "test")}
            tokenizer, words = str(z["tokenizer"]), z["words"].tolist() if "words" in z else []
            source = str(z["source"]) if "source" in z else ""
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); delete it and "
                         f"prepare it again") from e
    for s, sp in splits.items():
        if len(sp.offsets) != len(sp.labels) + 1 or sp.offsets[-1] != len(sp.tokens):
            raise UsageError(f"{path}: the {s} split's offsets do not match its tokens; delete it "
                             f"and prepare it again")
    return dict(splits, tokenizer=tokenizer, words=words, source=source)
