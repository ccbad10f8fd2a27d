"""
The tiny corpus: synthetic movie reviews with a graded, known sentiment, generated offline by code.

Every review is an opener and six opinions: five sentences about an aspect of the film and a closing
verdict, each carrying one graded word, from superb (+3) through decent (+1) to dull (-2) and awful
(-3). The truth is a probability that keeps rising as a review gets more positive:

    P(label = 1 | text) = sigmoid(K * D / D_MAX),
        D = the sum of the graded words' weights (clipped to D_MAX)

and the label is drawn from it, as a person's thumbs-up is a noisy function of what they wrote. Each
opinion is positive with the review's latent sentiment s ~ Beta(8, 8) (most reviews are mixed, a few
lean far) and takes a strength of 1, 2 or 3 at random. So a review whose six opinions are all +3 (P
= 0.982) is rare under the generator (about one in 10^3.6), and a policy has to move far from it to
write only those: the reward-vs-KL frontier keeps rising over several nats instead of stepping to
its ceiling. The weight D has a fixed denominator, so a shorter review cannot score higher than a
long one: writing less is never a way to the top. Why these numbers: data/tiny/readme.md.

    python data/tiny/prepare.py      # writes data/tiny/tiny.npz and data/tiny/meta.json

Tokens are the generator's words and punctuation marks (model.WordTokenizer over `vocabulary()`,
derived from the lists below, so nothing needs a file or the internet), and <|endoftext|> last.
"""
import hashlib
import json
import math
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from data.corpus import save_corpus  # noqa: E402
from model import WordTokenizer  # noqa: E402

TITLES = ["Moonfall", "The Quiet Harbor", "Red Summer", "Glass City", "The Last Orchard",
          "Night Train", "Paper Kings", "Blue Meridian", "The Long Winter", "Silver Lake",
          "Iron Garden", "Wild Hours"]
GENRES = ["drama", "comedy", "thriller", "western", "romance", "horror film", "mystery", "war film"]
ASPECTS = ["acting", "plot", "music", "dialogue", "ending", "cast", "script", "direction", "pacing",
           "camera work"]
# the graded words and their weights: three words at each strength, on each side
WEIGHTS = {"superb": 3, "brilliant": 3, "wonderful": 3, "great": 2, "gripping": 2, "moving": 2,
           "good": 1, "decent": 1, "charming": 1, "uneven": -1, "flat": -1, "weak": -1,
           "dull": -2, "boring": -2, "clumsy": -2, "awful": -3, "terrible": -3, "painful": -3}
OPENERS = ["I saw {t}.", "{t}, a {g}.", "We saw {t}.", "{t} ({y}).", "A {g}: {t}.", "So, {t}."]
OPINIONS = ["The {a} was {w}.", "I found the {a} {w}.", "The {a} felt {w}.", "What {w} {a}!"]
CLOSERS = ["Overall, {w}.", "In short, {w}.", "A {w} {g}."]
N_OPINIONS = 6  # five sentences and the verdict
D_MAX = 3 * N_OPINIONS  # the weight of a review whose every opinion is +3
K = 4.0  # the slope: P runs from sigmoid(-4) = 0.018 to sigmoid(4) = 0.982
LATENT = 8.0  # s ~ Beta(LATENT, LATENT)
YEARS = range(1950, 2024)


def vocabulary():
    """Every word and punctuation mark review() can write, in a fixed order (the token ids)."""
    texts = TITLES + GENRES + ASPECTS + list(WEIGHTS) + OPENERS + OPINIONS + CLOSERS
    words = [w for t in texts for w in re.findall(WordTokenizer.PATTERN, re.sub(r"\{\w\}", " ", t))]
    return list(dict.fromkeys(words)) + [str(y) for y in YEARS]


def p_positive(text):
    """The exact P(label = 1 | text) of the generator: sigmoid(K * D / D_MAX), D the sum of the
    graded words' weights, clipped to [-D_MAX, D_MAX] (a text with more opinions than a review gains
    nothing past the top). A function of the words alone, so it scores any text: a review, a
    sample, a fragment."""
    d = sum(WEIGHTS.get(w, 0) for w in re.findall(WordTokenizer.PATTERN, text))
    return 1 / (1 + math.exp(-K * max(-D_MAX, min(D_MAX, d)) / D_MAX))


def review(rng):
    """One synthetic review, its exact P(label = 1 | text), and its label drawn from that
    probability."""
    def pick(xs):
        return xs[rng.integers(len(xs))]
    s = rng.beta(LATENT, LATENT)
    words = []
    for _ in range(N_OPINIONS):  # positive with probability s, strength 1-3 uniform
        sign = 1 if rng.random() < s else -1
        strength = int(rng.integers(1, 4))
        words.append(pick([w for w, v in WEIGHTS.items() if v == sign * strength]))
    year = rng.integers(YEARS.start, YEARS.stop)
    parts = [pick(OPENERS).format(t=pick(TITLES), g=pick(GENRES), y=year)]
    parts += [pick(OPINIONS).format(a=pick(ASPECTS), w=w) for w in words[:-1]]
    parts.append(pick(CLOSERS).format(w=words[-1], g=pick(GENRES)))
    text = " ".join(parts)
    p = p_positive(text)
    return text, p, int(rng.random() < p)


def make_split(n, seed):
    rng = np.random.default_rng(seed)
    reviews = [review(rng) for _ in range(n)]
    return [t for t, _, _ in reviews], [y for _, _, y in reviews]


def generator_digest():
    """sha256 of this file: tiny.npz records the generator that made it, so that a changed
    generator (other rules, the same words) is not read as its own corpus (stages.load_data)."""
    with open(os.path.abspath(__file__), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def prepare(out_dir=HERE, n_train=12000, n_test=1000, seed=1337):
    splits = {"train": make_split(n_train, seed), "test": make_split(n_test, seed + 1)}
    return save_corpus(out_dir, "tiny", splits, WordTokenizer(vocabulary()), tokenizer="words",
                       source=generator_digest())


if __name__ == "__main__":
    meta = prepare()
    print(json.dumps(meta, indent=1))

# python data/tiny/prepare.py prints (156 words, <|endoftext|> = 156):
#  "tokenizer": "words",
#  "train": {"reviews": 12000, "positive": 5992, "tokens": 427868, "mean_tokens": 35.7},
#  "test": {"reviews": 1000, "positive": 459, "tokens": 35742, "mean_tokens": 35.7}
