"""data/pairs.py: a pairs file in either style, every kind of bad record, the cut to the block size,
the split.

    python -m pytest tests/test_pairs.py      (CPU; a second)
"""
import json
import os
import subprocess
import sys

import pytest

from data.corpus import UsageError
from data.pairs import cut_prompt, load_pairs, read_pairs, split_heldout, tokenize
from model import get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_BPE = os.path.join(REPO, "..", "shared", "tiktoken")
BYTES = get_tokenizer("bytes")  # one token a byte: counts are worked by hand
EOS = BYTES.eot_token


def write(path, records):
    raw = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    path.write_bytes(b"".join(r + b"\n" for r in raw))
    return str(path)


def gpt2_bpe(monkeypatch):
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        if not os.path.isdir(SHARED_BPE):
            pytest.skip("GPT-2's BPE files are not cached offline (set TIKTOKEN_CACHE_DIR)")
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", SHARED_BPE)
    return get_tokenizer("gpt2")


def test_both_styles_give_the_same_pairs(tmp_path):
    hh = "\n\nHuman: Is it good?\n\nAssistant:"
    explicit = [dict(prompt=hh, chosen=" Yes, it is.", rejected=" Yes, no.")]
    joined = [dict(chosen=hh + " Yes, it is.", rejected=hh + " Yes, no.")]  # the answers share " Yes, "
    a = read_pairs(write(tmp_path / "a.jsonl", explicit))
    b = read_pairs(write(tmp_path / "b.jsonl", joined))
    assert a == ([(1, hh, " Yes, it is.", " Yes, no.")], "prompt")
    assert b == ([(1, hh, " Yes, it is.", " Yes, no.")], "joined")  # at the marker, not after "Yes,"


def test_the_prompt_of_joined_texts_ends_at_a_boundary(tmp_path):
    two_turns = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: The"
    assert two_turns[:cut_prompt(two_turns)] == two_turns[:-4]  # the last marker's; " The" is answer
    assert cut_prompt("The movie was ") == 13  # before the space: " great" is one BPE token
    assert cut_prompt("Th") == 0  # no boundary: the whole texts are the responses
    records, style = read_pairs(write(tmp_path / "p.jsonl", [dict(chosen="The movie was great",
                                                                  rejected="The movie was awful")]))
    assert records == [(1, "The movie was", " great", " awful")] and style == "joined"


GOOD = dict(prompt="Hi", chosen=" there", rejected=" you")
BAD = [  # (line 2, what the one-line error must say)
    (b"{\"prompt\": \"Hi\", \"chosen\": \"a\xff\", \"rejected\": \"b\"}", "line 2: not UTF-8"),
    (b"{\"prompt\": \"Hi\", \"chosen\": ", "line 2: not a JSON record"),
    (b"[1, 2]", "line 2: expected a JSON object"),
    (dict(prompt="Hi", chosen=" a"), "line 2: no 'rejected' key"),
    (dict(chosen="Hi a", rejected="Hi b"), "line 2: no \"prompt\" key, but line 1 has one"),
    (dict(prompt="Hi", chosen=" a", rejected=3), "line 2: 'rejected' is a int; expected a string"),
    (dict(prompt=None, chosen=" a", rejected=" b"), "line 2: 'prompt' is a NoneType"),
    (dict(prompt="Hi", chosen="", rejected=" b"), "line 2: 'chosen' is empty"),
    (dict(prompt="Hi", chosen=" same", rejected=" same"), "line 2: chosen and rejected are the same"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_each_bad_record_is_one_line_naming_the_file_and_line(tmp_path, bad, message):
    path = write(tmp_path / "p.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(UsageError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}, {message}") and "\n" not in str(e.value), str(e.value)


def test_joined_records_that_leave_an_empty_response_or_mix_styles_are_refused(tmp_path):
    hh = "\n\nHuman: q\n\nAssistant:"
    with pytest.raises(UsageError, match=r"line 1: the chosen response is empty once the common"):
        read_pairs(write(tmp_path / "a.jsonl", [dict(chosen=hh, rejected=hh + " b")]))
    with pytest.raises(UsageError, match=r"line 2: a \"prompt\" key, but line 1 has none"):
        read_pairs(write(tmp_path / "b.jsonl", [dict(chosen=hh + " a", rejected=hh + " b"), GOOD]))
    with pytest.raises(UsageError, match="no records"):
        read_pairs(write(tmp_path / "c.jsonl", [b"", b"  "]))
    with pytest.raises(UsageError, match="nowhere.jsonl: no such file"):
        read_pairs(str(tmp_path / "nowhere.jsonl"))


def test_every_bad_line_is_named_once_in_file_order(tmp_path):
    path = write(tmp_path / "p.jsonl", [GOOD, BAD[3][0], GOOD, b"", BAD[8][0], BAD[0][0]])
    with pytest.raises(UsageError) as e:
        read_pairs(path)
    assert [line.split(":")[0] for line in str(e.value).splitlines()] == [
        f"{path}, line {n}" for n in (2, 5, 6)]


def test_the_command_checks_a_file_a_line_per_bad_record(tmp_path):
    path = write(tmp_path / "p.jsonl", [GOOD, dict(prompt="Hi", chosen=" a", rejected=" a"),
                                        dict(prompt="Hi", chosen=" a")])
    res = subprocess.run([sys.executable, os.path.join(REPO, "data", "pairs.py"), path],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"nanoDPO: error: {path}, line 2: chosen and rejected are the same text: a pair must differ",
        f"nanoDPO: error: {path}, line 3: no 'rejected' key; expected prompt, chosen, rejected"]


def test_tokens_are_prompt_then_response_tokenised_apart_and_a_finished_response_ends_with_eos():
    pairs, cuts = tokenize([(1, "ab", "cd", "e")], BYTES, block_size=16)
    assert pairs == dict(prompt=[[97, 98]], chosen=[[99, 100, EOS]], rejected=[[101, EOS]])
    assert cuts == dict(cut_prompts=0, cut_responses=0, dropped=0)


def test_the_block_size_cuts_the_prompts_beginning_first_then_the_responses_end():
    # room after the BOS: 9. A 3-token answer (2 + EOS) leaves 6 for the prompt: its last 6 of 8
    pairs, cuts = tokenize([(1, "abcdefgh", "xy", "z")], BYTES, block_size=10)
    assert pairs["prompt"] == [list(b"cdefgh")] and pairs["chosen"] == [[120, 121, EOS]]
    assert cuts == dict(cut_prompts=1, cut_responses=0, dropped=0)
    # long answers: the prompt keeps half the room (4 of 9), the responses their first 5, no EOS
    pairs, cuts = tokenize([(1, "abcdefgh", "0123456789", "xyz")], BYTES, block_size=10)
    assert pairs["prompt"] == [list(b"efgh")] and pairs["chosen"] == [list(b"01234")]
    assert pairs["rejected"] == [list(b"xyz") + [EOS]]  # it fits whole: its EOS kept
    assert cuts == dict(cut_prompts=1, cut_responses=1, dropped=0)
    for p, c, r in zip(*pairs.values()):
        assert 1 + len(p) + max(len(c), len(r)) <= 10
    # an answer one token too long loses only its EOS: it has not ended where the model sees it
    pairs, cuts = tokenize([(1, "", "012345678", "x")], BYTES, block_size=10)
    assert pairs["chosen"] == [list(b"012345678")] and cuts["cut_responses"] == 1
    # two answers that differ only past the cut are one answer: the pair is dropped, the others kept
    pairs, cuts = tokenize([(1, "", "0123456789", "012345678x"), (2, "a", "b", "c")], BYTES, 10)
    assert pairs["chosen"] == [[98, EOS]] and cuts == dict(cut_prompts=0, cut_responses=2, dropped=1)


def test_a_word_outside_the_vocabulary_names_its_line():
    words = get_tokenizer("words", ["good", "bad", "it", "is"])
    with pytest.raises(UsageError, match=r"p.jsonl, line 2: 'great' is not in the tokenizer's"):
        tokenize([(1, "it is", " good", " bad"), (2, "it is", " great", " bad")], words, 16, "p.jsonl")


def test_the_held_out_share_is_by_prompt_seeded_and_the_same_each_time():
    pairs = dict(prompt=[[i % 10] for i in range(40)], chosen=[[i] for i in range(40)],
                 rejected=[[100 + i] for i in range(40)])
    train, held = split_heldout(pairs, 0.2, seed=3)
    assert len(held["prompt"]) == 8 and len(train["prompt"]) == 32  # 2 of 10 prompts, 4 pairs each
    assert not {tuple(p) for p in held["prompt"]} & {tuple(p) for p in train["prompt"]}
    assert sorted(train["chosen"] + held["chosen"]) == sorted(pairs["chosen"])  # none lost, doubled
    for i, c in enumerate(held["chosen"]):  # each pair kept whole
        assert held["rejected"][i] == [100 + c[0]] and held["prompt"][i] == [c[0] % 10]
    assert split_heldout(pairs, 0.2, seed=3) == (train, held)
    assert split_heldout(pairs, 0.2, seed=4) != (train, held)
    assert split_heldout(pairs, 0.0, seed=3) == (pairs, dict(prompt=[], chosen=[], rejected=[]))
    with pytest.raises(UsageError, match="leaves no held-out prompt"):
        split_heldout(dict(prompt=[[1], [2]], chosen=[[1], [2]], rejected=[[3], [4]]), 0.1, 0)


def test_a_prompt_cut_differently_by_its_pairs_responses_is_still_on_one_side(tmp_path):
    # one prompt of 12 bytes, with short answers (kept whole) and with long ones (cut to half the
    # room): two token prompts of one text, which the split must not put on both sides
    prompt = "abcdefghijkl"
    records = [dict(prompt=prompt, chosen="x", rejected="y"),
               dict(prompt=prompt, chosen="0123456789", rejected="9876543210")]
    records += [dict(prompt=f"q{i}", chosen="x", rejected="y") for i in range(8)]
    path = write(tmp_path / "p.jsonl", records)
    for seed in range(20):
        train, held, _ = load_pairs(path, BYTES, 16, heldout=0.5, seed=seed, log=lambda _: None)
        assert len(train["prompt"]) + len(held["prompt"]) == 10
        sides = [{bytes(p[-4:]) for p in side["prompt"]} for side in (train, held)]
        assert b"ijkl" not in sides[0] & sides[1], f"seed {seed}: the prompt on both sides"


def test_gpt2_bpe_pairs_from_hh_records(tmp_path, monkeypatch):
    enc = gpt2_bpe(monkeypatch)
    hh = "\n\nHuman: What should I watch tonight?\n\nAssistant:"
    path = write(tmp_path / "hh.jsonl", [dict(chosen=hh + " A comedy.", rejected=hh + " Nothing."),
                                        dict(chosen=hh + " A drama.", rejected=hh + " Go away.")])
    lines = []
    train, held, info = load_pairs(path, enc, 1024, heldout=0.0, log=lines.append)
    assert info["style"] == "joined" and train["prompt"][0] == enc.encode_ordinary(hh)
    assert train["chosen"][0] == enc.encode_ordinary(" A comedy.") + [50256]  # GPT-2's <|endoftext|>
    assert len(lines) == 1 and all(w in lines[0] for w in ("2 pairs", "HH style", "0 prompts"))


def test_a_held_out_side_left_empty_by_the_cut_is_refused(tmp_path):
    # the only held-out prompt's pair is the same once cut to 10 bytes: nothing left to evaluate on
    path = write(tmp_path / "p.jsonl", [dict(prompt="a", chosen="0123456789", rejected="012345678x"),
                                       dict(prompt="b", chosen="x", rejected="y")])
    sides = [load_pairs(path, BYTES, 64, heldout=0.5, seed=s, log=lambda _: None)[1]["prompt"]
             for s in range(10)]
    seed = next(s for s, held in enumerate(sides) if held == [[97]])  # "a" held out
    with pytest.raises(UsageError, match="no held-out pair left"):
        load_pairs(path, BYTES, 10, heldout=0.5, seed=seed, log=lambda _: None)
