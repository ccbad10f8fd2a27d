"""
IMDb (Maas et al., ACL 2011): the 25k train and 25k test labelled reviews of the public
aclImdb_v1.tar.gz, tokenised with GPT-2's BPE, for the imdb preset of dpo.py.

    python data/imdb/prepare.py                          # downloads the archive (84 MB) into data/imdb/
    python data/imdb/prepare.py --source aclImdb_v1.tar.gz
    python data/imdb/prepare.py --source repack.tar.gz --sha256 <its digest>   # another copy, accepted with a warning

The archive's sha256 is checked: a download or a local copy whose digest differs is an error, unless
--sha256 names the digest you expect instead. The labelled reviews are read straight from the archive
(train|test / pos|neg; unsup/, *.feat, urls and the vocabulary are ignored), `<br />` becomes a newline,
and data/imdb/imdb.npz (format: data/corpus.py) and meta.json are written beside this file.
"""
import hashlib
import os
import re
import sys
import tarfile
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from data.corpus import OneLineParser, save_corpus  # noqa: E402
from errors import UsageError  # noqa: E402
from hf import download  # noqa: E402
from model import get_tokenizer  # noqa: E402

URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"  # 84,125,825 bytes
REVIEW = re.compile(r"^aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(source, out_dir, expected):
    """The archive's path: `source` if given, else downloaded into out_dir. Its digest must be `expected`."""
    if source is None:
        source = os.path.join(out_dir, "aclImdb_v1.tar.gz")
        if not os.path.exists(source):
            try:
                download(URL, source)
            except OSError as e:
                raise UsageError(f"could not download {URL} ({e}). Fetch it on a machine with internet and "
                                 f"pass it with --source, or put it at {source}") from e
    elif not os.path.exists(source):
        raise UsageError(f"--source {source} does not exist")
    digest = sha256_of(source)
    if digest != expected:
        raise UsageError(f"{source} has sha256 {digest}, expected {expected}. If this is a copy you trust "
                         f"(a repack, say), pass --sha256 {digest}")
    if digest != SHA256:
        print(f"warning: {source} is not the official aclImdb_v1.tar.gz (sha256 {digest}); accepted by --sha256",
              file=sys.stderr)
    return source


def read_reviews(archive):
    """{'train': (texts, labels), 'test': ...} from the archive, sorted by (label, id) for determinism."""
    found = {"train": [], "test": []}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                m = REVIEW.match(member.name)
                if m and member.isfile():
                    split, label, rid = m.group(1), int(m.group(2) == "pos"), int(m.group(3))
                    text = tar.extractfile(member).read().decode("utf-8").replace("<br />", "\n")
                    found[split].append((label, rid, text))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UsageError(f"{archive} is not a readable .tar.gz ({type(e).__name__}: {e}); fetch the archive again") from e
    for split, rows in found.items():
        if not rows:
            raise UsageError(f"{archive} holds no aclImdb/{split}/pos|neg/*.txt reviews: is it the IMDb archive?")
    for rows in found.values():
        rows.sort()  # the archive's member order does not matter
        # then a fixed shuffle: no stretch of a split is one label (r* calibrates on the last reviews)
        rows[:] = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    return {s: ([t for _, _, t in rows], [y for y, _, _ in rows]) for s, rows in found.items()}


def prepare(source=None, out_dir=HERE, sha256=SHA256, tokenizer="gpt2"):
    archive = fetch(source, out_dir, sha256)
    splits = read_reviews(archive)
    return save_corpus(out_dir, "imdb", splits, get_tokenizer(tokenizer), tokenizer)


if __name__ == "__main__":
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="a local copy of aclImdb_v1.tar.gz (default: download it)")
    p.add_argument("--sha256", default=SHA256, help="the digest to expect (default: the official archive's)")
    p.add_argument("--out", default=HERE, help="where imdb.npz and meta.json go")
    p.add_argument("--tokenizer", default="gpt2", choices=("gpt2", "bytes"), help="bytes: offline, for tests")
    a = p.parse_args()
    try:
        print(prepare(a.source, a.out, a.sha256, a.tokenizer))
    except UsageError as e:  # a user's mistake: one line, no traceback
        sys.exit(f"prepare.py: error: {e}")

# python data/imdb/prepare.py prints the counts:
# {'tokenizer': 'gpt2', 'train': {'reviews': 25000, 'positive': 12500, 'tokens': ..., 'test': {'reviews': 25000, ...}}
