"""data/imdb/prepare.py on a small fabricated archive in the exact aclImdb layout, and the imdb preset
of dpo.py end to end at toy sizes (a small GPT from scratch, the byte tokenizer: nothing downloaded).

    python -m pytest tests/test_imdb.py
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import experiment
import hf
from data.corpus import UsageError, load_corpus
from data.imdb import prepare as imdb

POS = ["A <br />great film.<br /><br />Loved the cast. " * 12, "Wonderful, moving and funny. " * 10]
NEG = ["Dull. <br />Awful acting, a weak plot. " * 9, "Boring from start to end. " * 11, "Bad."]


def fabricate(path):
    """A .tar.gz laid out like aclImdb_v1.tar.gz, labelled and unlabelled reviews and the other files."""
    files = {"aclImdb/README": "Large Movie Review Dataset v1.0", "aclImdb/imdb.vocab": "the\nand\n",
             "aclImdb/imdbEr.txt": "0.1\n", "aclImdb/train/labeledBow.feat": "9 0:1\n",
             "aclImdb/train/unsupBow.feat": "0 0:1\n", "aclImdb/train/urls_pos.txt": "http://x\n",
             "aclImdb/train/urls_neg.txt": "http://x\n", "aclImdb/train/urls_unsup.txt": "http://x\n",
             "aclImdb/test/urls_pos.txt": "http://x\n", "aclImdb/test/labeledBow.feat": "1 0:1\n",
             "aclImdb/train/unsup/0_0.txt": "An unlabelled review. " * 20, "aclImdb/train/unsup/1_0.txt": "Another."}
    for split in ("train", "test"):
        for i, text in enumerate(POS):
            files[f"aclImdb/{split}/pos/{100 + i}_{9 - i}.txt"] = text
        for i, text in enumerate(NEG):
            files[f"aclImdb/{split}/neg/{200 + i}_{1 + i}.txt"] = text
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_prepare_reads_labelled_reviews(tmp_path, capsys):
    archive = str(tmp_path / "fake.tar.gz")
    digest = fabricate(archive)
    meta = imdb.prepare(archive, str(tmp_path), sha256=digest, tokenizer="bytes")
    assert "not the official aclImdb_v1.tar.gz" in capsys.readouterr().err  # accepted, with a warning
    assert meta["train"]["reviews"] == 5 and meta["train"]["positive"] == 2 and meta["test"]["reviews"] == 5
    data = load_corpus(str(tmp_path / "imdb.npz"))
    train = data["train"]
    assert data["tokenizer"] == "bytes" and json.load(open(tmp_path / "meta.json")) == meta
    texts = [bytes(train.review(i).astype(np.uint8)).decode() for i in range(len(train))]
    # sorted by (label, id), then in one fixed shuffle (whatever the archive's order); <br /> became newlines
    want = [(0, t.replace("<br />", "\n")) for t in NEG] + [(1, t.replace("<br />", "\n")) for t in POS]
    order = np.random.default_rng(0).permutation(5)
    assert list(zip(train.labels.tolist(), texts)) == [want[i] for i in order]
    assert train.chars.tolist() == [len(t) for t in texts]
    assert not any("unlabelled" in t.lower() or "Another" in t for t in texts)


def test_checksum_mismatch_writes_nothing(tmp_path):
    archive = str(tmp_path / "fake.tar.gz")
    digest = fabricate(archive)
    with pytest.raises(ValueError, match=rf"has sha256 {digest}, expected {imdb.SHA256}.*--sha256 {digest}"):
        imdb.prepare(archive, str(tmp_path), tokenizer="bytes")
    assert not os.path.exists(tmp_path / "imdb.npz") and not os.path.exists(tmp_path / "meta.json")


def test_corrupt_archive_writes_nothing(tmp_path):
    archive = tmp_path / "fake.tar.gz"
    fabricate(str(archive))
    archive.write_bytes(archive.read_bytes()[:300])  # cut short
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="fake.tar.gz is not a readable .tar.gz"):
        imdb.prepare(str(archive), str(tmp_path), sha256=digest, tokenizer="bytes")
    assert not os.path.exists(tmp_path / "imdb.npz")


def test_partial_download_leaves_nothing(tmp_path, monkeypatch):
    class Cut(io.BytesIO):
        headers = {"Content-Length": "84125825"}
    monkeypatch.setattr(hf, "open_url", lambda url, timeout: Cut(b"x" * 1000))
    with pytest.raises(UsageError, match="could not download .*aclImdb_v1.tar.gz.*--source"):
        imdb.prepare(None, str(tmp_path), tokenizer="bytes")
    assert os.listdir(tmp_path) == []


def test_missing_source(tmp_path):
    with pytest.raises(UsageError, match="--source .*nope.tar.gz does not exist"):
        imdb.prepare(str(tmp_path / "nope.tar.gz"), str(tmp_path), tokenizer="bytes")


def test_imdb_preset_end_to_end_at_toy_sizes(tmp_path, capsys):
    archive = str(tmp_path / "fake.tar.gz")
    imdb.prepare(archive, str(tmp_path), sha256=fabricate(archive), tokenizer="bytes")
    fig = tmp_path / "imdb_frontier.png"
    experiment.main(["--preset", "imdb", "--init", "scratch", "--device", "cpu", "--data-dir", str(tmp_path),
              "--out", str(tmp_path / "out"), "--figure", str(fig), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
              "--block-size", "96", "--sft-steps", "3", "--classifier-steps", "3", "--dpo-steps", "2",
              "--eval-every", "1", "--batch", "4", "--dpo-batch", "4", "--n-prompts", "4", "--n-eval", "3", "--max-new-tokens", "6",
              "--warmup", "1", "--runs", "dpo:0.1,ft,ul:0.5", "--best-of", "1,2,4"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("nanoDPO: preset imdb on cpu")
    assert fig.stat().st_size > 10_000
    for run in ("dpo_0.1", "ft", "ul_0.5"):
        assert len(open(tmp_path / "out" / "runs" / run / "eval.jsonl").readlines()) == 3
    bon = [json.loads(x) for x in open(tmp_path / "out" / "best_of_n.jsonl")]
    assert [r["n"] for r in bon] == [1, 2, 4] and bon[0]["kl_bound"] == 0


def test_prepare_into_a_folder_that_does_not_exist_yet(tmp_path):
    archive = str(tmp_path / "fake.tar.gz")
    meta = imdb.prepare(archive, str(tmp_path / "new" / "folder"), sha256=fabricate(archive), tokenizer="bytes")
    assert meta["train"]["reviews"] > 0 and (tmp_path / "new" / "folder" / "imdb.npz").exists()


@pytest.mark.parametrize("case", ["missing", "checksum", "corrupt"])
def test_prepare_command_line_mistakes_are_one_line(tmp_path, case):
    archive = tmp_path / "fake.tar.gz"
    digest = fabricate(str(archive))
    args = {"missing": ["--source", str(tmp_path / "nope.tar.gz")], "checksum": ["--source", str(archive)],
            "corrupt": ["--source", str(archive), "--sha256", digest]}[case]
    if case == "corrupt":
        archive.write_bytes(archive.read_bytes()[:200])
        args[-1] = hashlib.sha256(archive.read_bytes()).hexdigest()
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "imdb", "prepare.py")
    res = subprocess.run([sys.executable, script, *args, "--tokenizer", "bytes", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=60)
    lines = [x for x in res.stderr.strip().splitlines() if not x.startswith("warning: ")]  # the repack's warning
    assert res.returncode != 0 and len(lines) == 1 and lines[0].startswith("prepare.py: error: "), res.stderr
    assert "delete" not in lines[0]  # never advise deleting the user's own --source file
