"""Shared test helpers: the tiny GPT, fixed preference pairs, a free port for the DDP tests, and float64
recomputations (log-probs, KL, scores) that the tests check the pipeline's numbers against."""
import copy
import datetime
import os
import socket
from contextlib import contextmanager

# The Triton kernels run through Triton's interpreter when there is no GPU. It must be set
# before triton is first imported, so it is set here, before any test module imports kernels/.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402

EOS = 256  # <|endoftext|> of the byte tokenizer
# where the fused kernel's tests run it: the GPU where there is one (Triton launches CUDA tensors only
# there), else the interpreter on the CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_gpt(seed=0, vocab=257, block=64, score_head=False):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block, vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, score_head=score_head))


def sharp_gpt(seed=0, vocab=257, block=64, score_head=False, scale=20.0):
    """tiny_gpt with its (tied) embedding scaled: logits with a spread of a few units, so that two of them have a
    KL of nats per token, not the ~1e-3 of two near-uniform random models; a score head likewise scaled."""
    model = tiny_gpt(seed, vocab, block, score_head)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(scale)
        if score_head:
            model.score_head.weight.mul_(scale * 5)
    return model


def f64_dists(model, prompt, response, bos):
    """log pi(. | BOS + prompt + response[:t]) over the whole vocabulary for every response token t, (len, V): a
    float64 copy of model run on the one unpadded sequence, logits through lm_head, log_softmax. A second path
    to what common.pack + the fused kernel compute."""
    m = copy.deepcopy(model).double().eval()
    seq = torch.tensor([[bos] + list(prompt) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(m.lm_head(m(seq)), -1)[0]
    return logp[len(prompt): len(prompt) + len(response)]


def f64_logprob(model, prompt, response, bos):
    """sum_t log pi(y_t | BOS + prompt + y_<t) in float64, as a float."""
    lp = f64_dists(model, prompt, response, bos)
    return lp[torch.arange(len(response)), torch.tensor(response)].sum().item()


def f64_score(rm, prompt, response, eos):
    """The scalar head in float64 on the text prompt + response (its EOS dropped), laid out as SFT reads text:
    BOS, the text; the head reads the hidden state of the text's last token."""
    m = copy.deepcopy(rm).double().eval()
    seq = torch.tensor([[eos] + list(prompt) + [t for t in response if t != eos]])
    with torch.no_grad():
        return m.score_head(m(seq)[0, -1]).item()


def recording(monkeypatch, module, name="sample"):
    """Replace module.<name> with a wrapper that records (args, result) of every call, and return the list."""
    calls, real = [], getattr(module, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out
    monkeypatch.setattr(module, name, wrapped)
    return calls


def random_pairs(n=8):
    """n fixed preference pairs of random byte tokens, and the function that drew them (for more tokens)."""
    g = torch.Generator().manual_seed(0)
    rand = lambda k: torch.randint(0, 256, (k,), generator=g).tolist()
    pairs = dict(prompt=[rand(3) for _ in range(n)], chosen=[rand(5) + [EOS] for _ in range(n)],
                 rejected=[rand(4) + [EOS] for _ in range(n)])
    return pairs, rand


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Interrupted(Exception):
    pass


def leave_process_group():
    """End of a test's rank: wait for every rank, then leave the process group. A rank that left while another
    was still exchanging with it could abort that one (gloo; a SIGABRT seen once in CI)."""
    torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    torch.distributed.destroy_process_group()


def interrupt_at(get_batch, step):
    """get_batch that raises at `step`, as a kill would stop a run there."""
    def wrapped(s):
        if s == step:
            raise Interrupted(f"killed at step {s}")
        return get_batch(s)
    return wrapped


@contextmanager
def killed_at(module, step):
    """Inside the block, the training loops of module (dpo, ppo, common's fit) stop at `step` as a kill would stop
    them there: module.set_lr, which every step calls first (after the step's evaluation), raises."""
    set_lr = module.set_lr

    def wrapped(opt, s, *args):
        if s == step:
            raise Interrupted(f"killed at step {s}")
        return set_lr(opt, s, *args)
    module.set_lr = wrapped
    try:
        yield
    finally:
        module.set_lr = set_lr


def assert_fused_matches_reference(model, loss_of):
    """loss_of(impl) through the fused kernel (the interpreter on a CPU) and through the plain reference: the
    same loss, and the same nonzero gradient of every parameter of model."""
    results = []
    for impl in ("triton", "reference"):
        model.zero_grad()
        loss = loss_of(impl)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_t, grads_t), (loss_r, grads_r) = results
    assert loss_t == pytest.approx(loss_r, rel=1e-5)
    for name, g in grads_r.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(grads_t[name], g, rtol=1e-4, atol=1e-6), name
