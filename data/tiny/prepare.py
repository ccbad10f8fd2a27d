"""
The tiny corpus: synthetic movie reviews with a known sentiment, generated offline by code.

Each review has a latent sentiment s in [0, 1], most often near 0 or 1. Every opinion sentence and
the closing verdict pick a positive word with probability s and a negative one otherwise; the label
is the majority of those (an odd number, so no ties). So reviews range from glowing through mixed to
scathing, the label is a function of the words, and a language model trained on them samples both
sentiments: the same situation as IMDb, small enough for a CPU.

    python data/tiny/prepare.py      # writes data/tiny/tiny.npz and data/tiny/meta.json

Tokens are the generator's words and punctuation marks (model.WordTokenizer over `vocabulary()`, derived
from the lists below, so nothing needs a file or the internet), and <|endoftext|> last.
"""
import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from data.corpus import save_corpus  # noqa: E402
from model import WordTokenizer  # noqa: E402

TITLES = ["Moonfall", "The Quiet Harbor", "Red Summer", "Glass City", "The Last Orchard", "Night Train",
          "Paper Kings", "Blue Meridian", "The Long Winter", "Silver Lake", "Iron Garden", "Wild Hours"]
GENRES = ["drama", "comedy", "thriller", "western", "romance", "horror film", "mystery", "war film"]
ASPECTS = ["acting", "plot", "music", "dialogue", "ending", "cast", "script", "direction", "pacing", "camera work"]
GOOD = ["great", "wonderful", "brilliant", "superb", "moving", "delightful", "excellent", "charming", "gripping"]
BAD = ["awful", "boring", "dull", "terrible", "weak", "clumsy", "painful", "bland", "lifeless"]
OPENERS = ["I saw {t}.", "{t}, a {g}.", "We saw {t}.", "{t} ({y}).", "A {g}: {t}.", "So, {t}."]
OPINIONS = ["The {a} was {w}.", "I found the {a} {w}.", "Honestly, the {a} felt {w}.", "The {a} is simply {w}.",
            "What {w} {a}!", "Everyone says the {a} is {w}, and it is."]
CLOSERS = {True: ["I loved it.", "Highly recommended.", "A must see.", "I would watch it again.", "Ten out of ten."],
           False: ["I hated it.", "Avoid it.", "A waste of time.", "I walked out.", "One out of ten."]}


YEARS = range(1950, 2024)


def vocabulary():
    """Every word and punctuation mark review() can write, in a fixed order (the token ids)."""
    texts = TITLES + GENRES + ASPECTS + GOOD + BAD + OPENERS + OPINIONS + CLOSERS[True] + CLOSERS[False]
    words = [w for t in texts for w in re.findall(WordTokenizer.PATTERN, re.sub(r"\{\w\}", " ", t))]
    return list(dict.fromkeys(words)) + [str(y) for y in YEARS]


def review(rng):
    """One synthetic review and its label (1 = positive)."""
    s = rng.beta(0.3, 0.3)  # most reviews lean clearly one way, some are mixed
    pick = lambda xs: xs[rng.integers(len(xs))]
    votes = rng.random(2 * rng.integers(1, 3) + 1) < s  # 3 or 5 opinions: positive or not
    parts = [pick(OPENERS).format(t=pick(TITLES), g=pick(GENRES), y=rng.integers(YEARS.start, YEARS.stop))]
    for positive in votes[:-1]:
        parts.append(pick(OPINIONS).format(a=pick(ASPECTS), w=pick(GOOD if positive else BAD)))
    parts.append(pick(CLOSERS[bool(votes[-1])]))
    return " ".join(parts), int(votes.sum() > len(votes) // 2)


def make_split(n, seed):
    rng = np.random.default_rng(seed)
    reviews = [review(rng) for _ in range(n)]
    return [t for t, _ in reviews], [y for _, y in reviews]


def prepare(out_dir=HERE, n_train=4000, n_test=1000, seed=1337):
    splits = {"train": make_split(n_train, seed), "test": make_split(n_test, seed + 1)}
    return save_corpus(out_dir, "tiny", splits, WordTokenizer(vocabulary()), tokenizer="words")


if __name__ == "__main__":
    meta = prepare()
    print(json.dumps(meta, indent=1))

# python data/tiny/prepare.py prints (178 words, <|endoftext|> = 178):
#  "tokenizer": "words",
#  "train": {"reviews": 4000, "positive": 1950, "tokens": 120236, "mean_tokens": 30.1},
#  "test": {"reviews": 1000, "positive": 490, "tokens": 29709, "mean_tokens": 29.7}
