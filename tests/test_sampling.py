"""sampling.py: completions, the text a scalar head reads and its score, samples drawn and scored in chunks
of 256.

    python -m pytest tests/test_sampling.py     (CPU; a few seconds)
"""
import copy
from types import SimpleNamespace

import numpy as np
import torch
from conftest import EOS, sharp_gpt, tiny_gpt

import sampling
import stages
from data.corpus import Split


def test_scores_read_the_text_as_the_classifier_was_trained_on_it():
    """score() of (prompt, response) equals the head on review_batches' layout of the same text."""
    tokens = np.array([5, 6, 7, 8, 9, 10, 11], np.uint16)
    split = Split(tokens, np.array([0, 7]), np.array([1], np.uint8), np.array([7], np.int32))
    idx, _, mask, labels = stages.ReviewBatches(split, 1, 64, EOS, 0)(0)
    rm = tiny_gpt(0, score_head=True)
    want = rm.score(rm(idx), mask)
    got = sampling.score(rm, [[5, 6, 7]], [[8, 9, 10, 11, EOS]], EOS, 64, "cpu")
    assert torch.allclose(got, want.detach()) and labels.tolist() == [1.0]
    assert sampling.reward(rm, [[5, 6, 7]], [[8, 9, 10, 11]], EOS, 64, "cpu") == torch.sigmoid(got)  # EOS or not


def test_samples_keep_the_eos_they_drew():
    """A model whose EOS logit is high: a response shorter than max_new_tokens ends with the EOS it sampled, and
    no EOS comes before the end (sampling stops there)."""
    model = tiny_gpt(0)
    with torch.no_grad():  # the EOS embedding along ln_f's bias: EOS has probability ~0.2 at every step
        model.transformer.ln_f.bias.copy_(torch.linspace(-1, 1, 32))
        model.transformer.wte.weight[EOS] = torch.linspace(-1, 1, 32) * 0.37
    out = sampling.sample(model, [[1, 2], [3]] * 40, 8, EOS, 0, "cpu")
    short = [r for r in out if len(r) < 8]
    assert len(short) >= 20 and all(r[-1] == EOS for r in short)
    assert all(EOS not in r[:-1] for r in out) and any(len(r) == 8 and r[-1] != EOS for r in out)


def test_each_chunk_of_256_prompts_draws_from_its_own_seed():
    """sample_and_score over 512 copies of one prompt: the second chunk (seeded by its start, 256) does not repeat
    the first one's draws."""
    args = SimpleNamespace(max_new_tokens=6, seed=0, device="cpu")
    samples, scores = sampling.sample_and_score(tiny_gpt(0), lambda p, s: torch.tensor([len(x) for x in s]),
                                              [[1, 2]] * 512, args, EOS, "test")
    assert len(samples) == 512 and scores == [len(s) for s in samples]
    assert samples[256:] != samples[:256]


def test_sample_and_score_over_the_chunk_boundary_of_256():
    """sampling.sample (greedy, on cpu) and sampling.score on 260 distinct prompts (chunks 0-255 and 256-259): response
    i is the argmax continuation of prompt i computed alone on its unpadded layout, and score i is the float64 head
    on (prompt i, response i)."""
    model, rm = sharp_gpt(0, scale=5.0), sharp_gpt(1, score_head=True)
    prompts = [[a, b] for a in range(13) for b in range(20)]  # 260 distinct prompts
    got = sampling.sample(model, prompts, 2, EOS, 0, "cpu", temperature=0)
    assert len(got) == 260
    with torch.no_grad():
        for p, r in zip(prompts, got):
            seq = [EOS] + p
            for _ in range(2):
                seq.append(int(model.lm_head(model(torch.tensor([seq]))[0, -1]).argmax()))
                if seq[-1] == EOS:
                    break
            assert r == seq[len(p) + 1:], p
    responses = [[p[1], p[0] + 3] + ([EOS] if i % 3 == 0 else []) for i, p in enumerate(prompts)]  # some keep EOS
    scores = sampling.score(rm, prompts, responses, EOS, 64, "cpu")
    rm64 = copy.deepcopy(rm).double().eval()
    with torch.no_grad():
        want = [rm64.score_head(rm64(torch.tensor([[EOS] + p + r[:2]]))[0, -1]).item() for p, r in zip(prompts, responses)]
    assert scores.shape == (260,)
    torch.testing.assert_close(scores.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_sample_draws_on_past_the_chunk_boundary_of_256():
    """sampling.sample of 300 copies of one prompt at temperature 1 (on cpu): the chunk from 256 on continues the
    generator's stream, it does not repeat the draws of the first chunk."""
    out = sampling.sample(tiny_gpt(0), [[1, 2]] * 300, 6, EOS, 0, "cpu")
    first = [r[0] for r in out]  # a re-seeded chunk would repeat at least its first draws (a batch of 44, not 256)
    assert len(out) == 300 and first[256:] != first[:44]
