"""model.py against Hugging Face's GPT-2, generation with and without the KV cache, the tokenizers.

    python -m pytest tests/test_model.py      (CPU; the `gpu` tests need CUDA)
"""
import copy
import math
import os

import pytest
import torch

import model as model_module
from data.corpus import UsageError
from data.tiny.prepare import make_split, vocabulary
from hf import from_pretrained
from model import GPT, GPTConfig, get_tokenizer



def need_transformers():
    """Only the tests that build a Hugging Face model need transformers (requirements-test.txt): they skip
    without it, the rest of this file runs."""
    return pytest.importorskip("transformers", reason="test-only dependency (requirements-test.txt)")

ODD = dict(n_embd=48, n_head=3, n_layer=3, vocab_size=317, n_positions=64)


def hf_model(seed=0):
    transformers = need_transformers()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**ODD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def save(hf, path, layout):
    hf.save_pretrained(path)  # config.json + model.safetensors
    if layout == "bin":  # transformers 5 writes only safetensors: make the .bin layout by hand
        os.remove(os.path.join(path, "model.safetensors"))
        torch.save(hf.state_dict(), os.path.join(path, "pytorch_model.bin"))
    return path


def assert_close(a, b, atol, rtol=0.0):
    diff = (a.double() - b.double()).abs()
    assert torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol), \
        f"max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}"


def mixed_prompts(vocab, lengths=(2, 5, 8, 3, 7, 4), seed=1):
    """Left-padded prompts of lengths 2..8 in one batch, and their mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    idx = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        idx[i, T - n:] = torch.randint(vocab, (n,), generator=g)
        mask[i, T - n:] = True
    return idx, mask


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_parity_with_transformers(tmp_path, layout):
    hf = hf_model()
    ours = from_pretrained(save(hf, str(tmp_path), layout)).eval()
    idx = torch.randint(ODD["vocab_size"], (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        logits = ours.lm_head(ours(idx))
    assert_close(logits, expected, atol=1e-5)
    # greedy generation: same tokens as transformers (one unpadded batch, no EOS)
    prompt = idx[:, :6]
    with torch.no_grad():
        hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                             min_new_tokens=12, pad_token_id=0, eos_token_id=None)[:, 6:]
    new, new_mask = ours.generate(prompt, torch.ones_like(prompt, dtype=torch.bool), 12, temperature=0)
    assert torch.equal(new, hf_out) and new_mask.all()


def test_lm_head_is_tied_and_dropout_configurable():
    m = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=8, dropout=0.25))
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.transformer.h[0].attn.dropout == 0.25
    assert m(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 8)  # hidden states, not logits


def f64_gpt2(m, idx):
    """GPT-2's forward written out in float64 from the state dict: embeddings of tokens and positions 0..T-1, per
    block x += attn(ln_1(x)) (causal softmax over heads), x += mlp(ln_2(x)) with the tanh GELU, then ln_f."""
    sd = {k: v.double() for k, v in m.state_dict().items()}
    B, T = idx.shape
    C, H = m.config.n_embd, m.config.n_head

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / (var + 1e-5).sqrt() * sd[name + ".weight"] + sd[name + ".bias"]
    linear = lambda x, name: x @ sd[name + ".weight"].T + sd[name + ".bias"]
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][torch.arange(T)]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for layer in range(m.config.n_layer):
        p = f"transformer.h.{layer}."
        qkv = linear(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, -1)
        q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in qkv)
        att = (q @ k.transpose(-1, -2) / math.sqrt(C // H)).masked_fill(future, float("-inf")).softmax(-1)
        x = x + linear((att @ v).transpose(1, 2).reshape(B, T, C), p + "attn.c_proj")
        a = linear(ln(x, p + "ln_2"), p + "mlp.c_fc")
        x = x + linear(0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3))), p + "mlp.c_proj")
    return ln(x, "transformer.ln_f")


def test_forward_is_gpt2_written_out_in_float64():
    """model(idx) against f64_gpt2 on every weight perturbed (biases and LayerNorms not at their init), a sequence
    of the whole block size: the same hidden states in training and evaluation mode (dropout 0); one token more
    than the block is refused."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=8))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    idx = torch.randint(50, (3, 16))
    want = f64_gpt2(m, idx)
    m64 = copy.deepcopy(m).double()
    for mode in (True, False):
        torch.testing.assert_close(m64.train(mode)(idx), want, rtol=0, atol=1e-10)
    torch.testing.assert_close(m.eval()(idx).double(), want, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="sequence of 17 tokens is longer than block_size 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_init_is_gpt2s_normal_0_02_with_scaled_residual_projections():
    """Weights N(0, 0.02), the residual projections (c_proj) N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorms
    (1, 0); measured on 8 layers of width 64 (tens of thousands of draws per group, std within 3%)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=500, n_layer=8, n_head=4, n_embd=64))
    groups = {"proj": [], "other": []}
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):
            groups["proj"].append(p.detach().flatten())
        elif name.endswith(".weight") and p.dim() == 2:
            groups["other"].append(p.detach().flatten())
        elif name.endswith("bias"):
            assert p.abs().max() == 0, name
        else:  # LayerNorm weights
            assert torch.equal(p, torch.ones_like(p)), name
    for group, std in (("proj", 0.02 / 4), ("other", 0.02)):
        w = torch.cat(groups[group]).double()
        assert w.std().item() == pytest.approx(std, rel=0.03), group
        assert abs(w.mean().item()) < 4 * std / len(w) ** 0.5, group
    assert m.score_head is None


def test_score_head_reads_the_hidden_state_of_each_rows_last_true():
    """score(h, mask) = score_head(h[i, n_i - 1]) with n_i the row's True count, for rows of 1, 3 and 6 tokens."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=8, score_head=True))
    h = torch.randn(3, 6, 8)
    mask = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    with torch.no_grad():
        want = torch.stack([h[i, n - 1] @ m.score_head.weight[0] + m.score_head.bias[0]
                            for i, n in enumerate((1, 3, 6))])
        torch.testing.assert_close(m.score(h, mask), want)


@pytest.mark.parametrize("temperature,top_k", [(0, None), (1.0, None), (0.8, 20)])
def test_kv_cache_matches_no_cache(temperature, top_k):
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=3, n_embd=48)).eval()
    idx, mask = mixed_prompts(97)
    runs = [m.generate(idx, mask, 20, temperature=temperature, top_k=top_k, eos=5,
                       generator=torch.Generator().manual_seed(3), use_cache=c) for c in (True, False)]
    (a, am), (b, bm) = runs
    assert torch.equal(a, b) and torch.equal(am, bm)


def test_generate_left_padding_matches_unpadded():
    """A left-padded row continues exactly as the same prompt run alone."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=3, n_embd=48)).eval()
    idx, mask = mixed_prompts(97)
    batch, _ = m.generate(idx, mask, 10, temperature=0)
    for i in range(idx.size(0)):
        alone = idx[i][mask[i]][None]
        single, _ = m.generate(alone, torch.ones_like(alone, dtype=torch.bool), 10, temperature=0)
        assert torch.equal(batch[i], single[0]), f"row {i}"


def test_generate_stops_rows_at_eos():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=7, n_layer=1, n_head=1, n_embd=8)).eval()
    idx, mask = mixed_prompts(7, lengths=(2, 4, 3, 5) * 4)
    new, new_mask = m.generate(idx, mask, 30, temperature=1.0, eos=3, generator=torch.Generator().manual_seed(0))
    for row, row_mask in zip(new, new_mask):
        hits = (row == 3).nonzero()
        if len(hits):  # everything after the first EOS is masked out; the EOS itself is kept
            first = hits[0, 0].item()
            assert row_mask[:first + 1].all() and not row_mask[first + 1:].any()
        else:
            assert row_mask.all()
    assert new.size(1) <= 30


def test_generate_rejects_too_long():
    m = GPT(GPTConfig(block_size=8, vocab_size=7, n_layer=1, n_head=1, n_embd=8))
    idx = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size 8"):
        m.generate(idx, torch.ones_like(idx, dtype=torch.bool), 3)


def test_score_head_reads_last_real_token():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=8, score_head=True)).eval()
    idx = torch.randint(20, (2, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    full = m.score(m(idx), mask)
    alone = m.score(m(idx[:1, :3]), mask[:1, :3])
    assert full.shape == (2,) and torch.allclose(full[0], alone[0], atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_score_head_runs_in_fp32_under_bf16_autocast(device):
    """Rewards quantised to bf16 (steps of ~0.02 near 2) tie close pairs, which pairs_from then drops."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=8, score_head=True)).to(device).eval()
    h = torch.randn(64, 4, 8, device=device) * 40  # logits of a few units, spread
    mask = torch.ones(64, 4, dtype=torch.bool, device=device)
    with torch.no_grad():
        plain = m.score(h, mask)
        with torch.autocast(device, dtype=torch.bfloat16):
            autocast = m.score(h, mask)
    assert autocast.dtype == torch.float32 and torch.allclose(autocast, plain, rtol=1e-6, atol=1e-6)
# ---------------------------------------------------------------- sampling against softmax(logits / T), step by step

def sharp_model(vocab=7, wpe_scale=1.0, seed=0):
    """A small GPT whose logits spread over units (embedding x 15), optionally with positions that matter."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(15)
        m.transformer.wpe.weight.mul_(wpe_scale)
    return m


def first_token_frequencies(m, n=20000, **kw):
    prompt = torch.tensor([[1, 2, 3]]).expand(n, 3)
    new, _ = m.generate(prompt, torch.ones_like(prompt, dtype=torch.bool), 1, generator=torch.Generator().manual_seed(0),
                        **kw)
    return torch.bincount(new[:, 0], minlength=m.config.vocab_size).double() / n


def test_draw_follows_the_probabilities_and_never_draws_a_zero(monkeypatch):
    """model.draw (inverse CDF): 50000 draws per row within 5 standard errors of each row's probabilities, tokens of
    probability 0 (first, middle, last) never drawn; and at the extreme uniforms (0 and the largest below 1) it still
    picks a token of positive probability."""
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0], [0.1, 0.1, 0.1, 0.1, 0.1, 0.5]])
    rows = probs.repeat_interleave(50000, 0)
    tok = model_module.draw(rows, torch.Generator().manual_seed(0)).view(2, 50000)
    for p, t in zip(probs, tok):
        freq = torch.bincount(t, minlength=6).double() / 50000
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / 50000).sqrt() + 1e-12).all(), (freq, p)
        assert (freq[p == 0] == 0).all()
    for nan_or_zero in (float("nan"), 0.0):  # a broken row is an error, as torch.multinomial's
        with pytest.raises(FloatingPointError, match="not finite or sums to 0"):
            model_module.draw(torch.cat([probs, torch.full((1, 6), nan_or_zero)]))
    edges = torch.tensor([[0.0], [1 - 2.0 ** -24], [0.0], [1 - 2.0 ** -24]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: edges.to(k.get("dtype", torch.float32)))
    # rows summing to 1 and to 0.5: u spans (0, total]
    assert model_module.draw(torch.cat([probs[:1], probs[:1], 0.5 * probs[:1], 0.5 * probs[:1]])).tolist() == [4, 1, 4, 1]


@pytest.mark.parametrize("temperature, top_k", [(0.5, None), (1.0, None), (2.0, 3), (1.0, 1)])
def test_sampling_frequencies_are_softmax_of_logits_over_temperature_within_top_k(temperature, top_k):
    """20000 draws of the first token: frequencies within 5 standard errors of softmax(logits / T) (float64, from
    a plain forward), restricted to the k highest logits and renormalised; the other tokens never drawn."""
    m = sharp_model()
    with torch.no_grad():
        logits = m.lm_head(m(torch.tensor([[1, 2, 3]])))[0, -1].double()
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep[logits.topk(top_k or len(logits)).indices] = True
    p = torch.softmax((logits / temperature).masked_fill(~keep, float("-inf")), -1)
    freq = first_token_frequencies(m, temperature=temperature, top_k=top_k)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / 20000).sqrt() + 1e-9).all(), (freq, p)
    assert (freq[~keep] == 0).all() and (freq[p * 20000 > 10] > 0).all()  # each token expected 10 times drawn
    plain = torch.softmax(logits, -1)  # the case tells T and top-k apart from plain sampling
    assert (temperature, top_k) == (1.0, None) or (plain - p).abs().max() > 0.05


def test_generate_positions_are_those_of_the_prompt_alone():
    """Positions that matter (position embedding x 30): greedy generation of left-padded prompts (cache or not)
    gives, token by token, the argmax of a plain forward of the unpadded prompt and what came so far, at
    positions 0, 1, ...; with positions shifted by one the same plain forward would give other tokens."""
    m = sharp_model(vocab=97, wpe_scale=30.0)
    idx, mask = mixed_prompts(97)

    def greedy(prompt, shift):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                x = torch.tensor([seq])
                seq.append(int(m.lm_head(m(x, pos=torch.arange(shift, shift + len(seq))[None]))[0, -1].argmax()))
        return seq[len(prompt):]
    want = [greedy(idx[i][mask[i]].tolist(), 0) for i in range(len(idx))]
    assert want != [greedy(idx[i][mask[i]].tolist(), 1) for i in range(len(idx))]
    for use_cache in (True, False):
        new, _ = m.generate(idx, mask, 6, temperature=0, use_cache=use_cache)
        assert new.tolist() == want, use_cache


def test_generate_under_bf16_autocast_on_cpu():
    """What sampling does on CUDA (common.amp: bf16 autocast), on a CPU: the KV cache (bf16) takes bf16 keys
    and values; cached and uncached greedy generation agree, and agree with fp32 where the logits are far apart."""
    m = sharp_model(vocab=97, wpe_scale=30.0)
    idx, mask = mixed_prompts(97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runs = [m.generate(idx, mask, 6, temperature=0, eos=5, use_cache=c) for c in (True, False)]
        sampled, _ = m.generate(idx, mask, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    (a, am), (b, bm) = runs
    assert torch.equal(a, b) and torch.equal(am, bm)
    fp32, _ = m.generate(idx, mask, 6, temperature=0, eos=5)
    assert (a[:, 0] == fp32[:, 0]).all() and ((0 <= sampled) & (sampled < 97)).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_generate_samples_from_fp32_logits_under_bf16_autocast(device, monkeypatch):
    """Under bf16 autocast (common.amp on CUDA; CPU autocast stands in for it) every draw's
    probabilities are softmax(fp32 logits / T) of the last hidden state (after ln_f, as the step
    computed it), not of logits rounded to bf16: logits of about -60 (GPT-2's size), where bf16's
    step of 0.25 moves probabilities by a fifth."""
    m = sharp_model(vocab=97).to(device)
    # every logit -60 plus a spread of a few units, as GPT-2's: h[0] = 1, w[:, 0] = -60
    with torch.no_grad():
        m.transformer.wte.weight[:, 0] = -60.0
        m.transformer.ln_f.weight[0], m.transformer.ln_f.bias[0] = 0.0, 1.0
    idx, mask = (x.to(device) for x in mixed_prompts(97))
    hidden, probs = [], []
    m.transformer.ln_f.register_forward_hook(lambda mod, args, out: hidden.append(out[:, -1]))
    draw = model_module.draw

    def recorded(p, generator=None):  # the probabilities each draw is made from
        probs.append(p)
        return draw(p, generator)
    monkeypatch.setattr(model_module, "draw", recorded)
    with torch.autocast(device, dtype=torch.bfloat16):
        m.generate(idx, mask, 4, temperature=0.7, generator=torch.Generator(device).manual_seed(0))
    assert len(probs) == len(hidden) == 4
    for h, p in zip(hidden, probs):
        logits = h.double() @ m.lm_head.weight.detach().double().t()
        assert logits.max() < -50
        want = torch.softmax(logits / 0.7, -1)
        rounded = torch.softmax(logits.to(torch.bfloat16).double() / 0.7, -1)
        rel = lambda q: ((q.double() - want).abs() / want).max().item()
        assert rel(p) < 1e-4 and rel(rounded) > 0.1, (rel(p), rel(rounded))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_kv_cache_is_allocated_in_the_autocast_dtype(device, monkeypatch):
    """Keys and values come out of c_attn in bf16 under autocast: the cache holds bf16 (half the
    memory of the fp32 weights' dtype, no cast at each step), and the weights' dtype without autocast."""
    made = []

    class Recorded(model_module.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self.k.dtype)
    monkeypatch.setattr(model_module, "KVCache", Recorded)
    m = sharp_model(vocab=97).to(device)
    idx, mask = (x.to(device) for x in mixed_prompts(97))
    with torch.autocast(device, dtype=torch.bfloat16):
        m.generate(idx, mask, 3, temperature=0)
    m.generate(idx, mask, 3, temperature=0)
    assert made == [torch.bfloat16, torch.float32]


def ragged_batch(vocab=97, lengths=(9, 3, 14, 1, 6)):
    """Right-padded rows of the given real lengths, padding a token the model never sees at a real position."""
    g = torch.Generator().manual_seed(3)
    idx = torch.full((len(lengths), max(lengths)), vocab - 1)
    for i, n in enumerate(lengths):
        idx[i, :n] = torch.randint(0, vocab - 1, (n,), generator=g)
    return idx, torch.tensor(lengths), torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_skipping_the_padding_leaves_every_real_position_and_gradient_as_it_was(device):
    """GPT.forward(lengths=): the MLPs run on the real positions only; their hidden states, and the gradients of
    every parameter through them, are those of the full padded forward (and of each row alone)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=3, n_head=3, n_embd=48)).to(device)
    idx, lengths, real = (x.to(device) for x in ragged_batch())
    grads = []
    for kw in ({}, {"lengths": lengths}):
        m.zero_grad()
        h = m(idx, **kw)
        (h[real] ** 2).sum().backward()
        grads.append(({n: p.grad.clone() for n, p in m.named_parameters()}, h[real].detach()))
    (g_full, h_full), (g_skip, h_skip) = grads
    torch.testing.assert_close(h_skip, h_full, rtol=0, atol=1e-5)
    for n in g_full:
        torch.testing.assert_close(g_skip[n], g_full[n], rtol=1e-4, atol=1e-5, msg=n)
    alone = torch.cat([m(idx[i:i + 1, :n]).detach()[0] for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(h_skip, alone, rtol=0, atol=1e-5)
    with torch.no_grad():  # and the padding was skipped: its states are left unfinished
        assert (m(idx)[~real] - m(idx, lengths=lengths)[~real]).abs().max() > 1e-2


def test_skipping_the_padding_under_bf16_autocast_on_cpu():
    """Under bf16 autocast (what common.amp does on CUDA) the MLP's bf16 output joins the fp32 residual stream."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=32))
    idx, lengths, real = ragged_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, skip = m(idx), m(idx, lengths=lengths)
    torch.testing.assert_close(skip[real].float(), full[real].float(), rtol=0, atol=3e-2)


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_is_offline_and_lossless():
    enc = get_tokenizer("bytes")
    text = "A film. Ünïcode ok!\n"
    ids = enc.encode(text)
    assert ids == list(text.encode("utf-8")) and enc.decode(ids) == text
    assert enc.encode("<|endoftext|>", allowed_special="all") == [256] and enc.n_vocab == 257


def test_word_tokenizer_rebuilds_every_generated_review_and_names_an_unknown_word():
    enc = get_tokenizer("words", vocabulary())
    texts, _ = make_split(500, 7)
    ids = enc.encode_ordinary_batch(texts)
    assert all(enc.decode(x) == t for x, t in zip(ids, texts))
    assert enc.encode_ordinary("I saw Moonfall (1987).") == [enc.ids[w] for w in ("I", "saw", "Moonfall", "(", "1987", ")", ".")]
    assert enc.eot_token == enc.n_vocab - 1 == len(vocabulary()) and enc.decode([enc.eot_token]) == "<|endoftext|>"
    assert max(max(x) for x in ids) < enc.eot_token  # the EOS never comes from text
    with pytest.raises(ValueError, match=f"'splendid' is not in the tokenizer's vocabulary of {len(vocabulary())} words"):
        enc.encode_ordinary("A splendid film.")


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
def test_cuda_bf16_autocast_and_generate():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=317, n_layer=3, n_head=3, n_embd=48)).cuda().eval()
    idx, mask = mixed_prompts(317)
    idx, mask = idx.cuda(), mask.cuda()
    with torch.no_grad():
        ref = m.lm_head(m(idx[:, -2:])).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m.lm_head(m(idx[:, -2:])).float()
    assert_close(out, ref, atol=5e-2)
    a, am = m.generate(idx, mask, 16, temperature=0, use_cache=True)
    b, bm = m.generate(idx, mask, 16, temperature=0, use_cache=False)
    assert torch.equal(a, b) and torch.equal(am, bm)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as sampling.sample runs it on CUDA (common.amp)
        c, cm = m.generate(idx, mask, 16, temperature=0, use_cache=True)
        d, dm = m.generate(idx, mask, 16, temperature=0, use_cache=False)
    assert torch.equal(c, d) and torch.equal(cm, dm)


def test_gpt2_bpe_offline_is_one_line(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve the host")  # what requests raises, an OSError
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UsageError, match="could not fetch GPT-2's BPE files for tiktoken .*TIKTOKEN_CACHE_DIR"):
        get_tokenizer("gpt2")


def softmax_attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):
    """Attention by its definition: a row with no key to attend is a softmax over nothing, NaN (torch 2.13's CPU
    SDPA returns 0 there; other backends and versions need not)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("attention", ["sdpa", "softmax"])
def test_generate_of_left_padded_prompts_through_two_layers(attention, monkeypatch):
    """Two layers (on cpu): the padding positions' hidden states enter the second layer's keys, so a padding query
    with no key to attend (NaN under the softmax's definition) would spoil every row. Greedy generation of
    left-padded prompts, cached and not, gives the argmax of a plain forward of each unpadded prompt, and no NaN."""
    if attention == "softmax":
        monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", softmax_attention)
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(15)
    idx, mask = mixed_prompts(97)

    def greedy(prompt):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(m.lm_head(m(torch.tensor([seq])))[0, -1].argmax()))
        return seq[len(prompt):]
    want = [greedy(idx[i][mask[i]].tolist()) for i in range(len(idx))]
    for use_cache in (True, False):
        new, _ = m.generate(idx, mask, 6, temperature=0, use_cache=use_cache)
        assert new.tolist() == want, use_cache
        sampled, _ = m.generate(idx, mask, 6, temperature=1.0, generator=torch.Generator().manual_seed(0),
                                use_cache=use_cache)
        assert ((0 <= sampled) & (sampled < 97)).all()
