"""Shared test helpers: the tiny GPT, fixed preference pairs, a free port for the DDP tests."""
import os
import socket

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


def interrupt_at(get_batch, step):
    """get_batch that raises at `step`, as a kill would stop a run there."""
    def wrapped(s):
        if s == step:
            raise Interrupted(f"killed at step {s}")
        return get_batch(s)
    return wrapped


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
