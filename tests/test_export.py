"""The way out: hf.save_hf (a Hugging Face GPT-2 folder) loaded by transformers and by
hf.from_pretrained, the safetensors writer, checkpoints that carry their config (model_record), and
export.py.

    python -m pytest tests/test_export.py      (CPU; a few seconds)
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from data.corpus import UsageError, load_checkpoint, save_checkpoint
from hf import from_pretrained, read_safetensors, save_hf, write_safetensors
from model import GPT, GPTConfig, model_from_record, model_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ODD = dict(block_size=64, vocab_size=317, n_layer=3, n_head=3, n_embd=48)  # an odd vocabulary, 3 heads


def trained_like(seed=0, **kw):
    """A GPT whose every weight is random, biases and LayerNorms included (a fresh one's are 0 and
    1, which would hide a bias or a LayerNorm written to the wrong name)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**(ODD | kw)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_transformers_loads_the_export_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers", reason="test-only (requirements-test.txt)")
    ours = trained_like()
    folder = save_hf(ours, str(tmp_path / "hf"), "gpt2")
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(ODD["vocab_size"], (3, 64), generator=g)  # device: cpu
    with torch.no_grad():
        expected = ours.lm_head(ours(idx))
        got = hf.eval()(idx).logits
    assert got.dtype == torch.float32 and (got - expected).abs().max() <= 1e-5
    assert hf.config.nanodpo["tokenizer"] == "gpt2" and hf.config.eos_token_id == 316


def test_the_export_round_trips_through_from_pretrained(tmp_path):
    ours = trained_like(seed=2)
    back = from_pretrained(save_hf(ours, str(tmp_path / "hf"), "gpt2")).eval()
    assert back.config == ours.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    idx = torch.randint(ODD["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back.lm_head(back(idx)), ours.lm_head(ours(idx)))


def test_a_scalar_head_is_not_exported_and_the_tokenizer_is_recorded(tmp_path):
    rm = trained_like(score_head=True)
    folder = save_hf(rm, str(tmp_path / "hf"), "words", words=["good", "bad"])
    names = set(read_safetensors(os.path.join(folder, "model.safetensors")))
    assert not any("score_head" in n or "lm_head" in n for n in names)
    assert "transformer.h.2.attn.c_attn.weight" in names
    assert len(names) == 4 + 12 * 3  # wte, wpe, ln_f's two; 12 a block
    weights = read_safetensors(os.path.join(folder, "model.safetensors"))
    assert weights["transformer.h.0.mlp.c_fc.weight"].shape == (48, 192)  # Conv1D: (in, out)
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["nanodpo"]["tokenizer"] == "words" and config["nanodpo"]["words"] == ["good", "bad"]
    assert config["n_positions"] == 64 and config["tie_word_embeddings"]


def test_an_export_replaces_an_earlier_one_and_refuses_anything_else(tmp_path):
    a, b = trained_like(seed=0), trained_like(seed=1)
    folder = save_hf(a, str(tmp_path / "hf"), "gpt2")
    save_hf(b, folder, "gpt2")
    assert torch.equal(from_pretrained(folder).transformer.wte.weight, b.transformer.wte.weight)
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary folder left beside it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="mine exists and is not a nanoDPO export"):
        save_hf(a, str(tmp_path / "mine"), "gpt2")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_safetensors_written_by_hand_read_back_by_the_library(tmp_path):
    load_file = pytest.importorskip("safetensors.torch", reason="comes with transformers").load_file
    sd = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 3).bfloat16(),
          "d": torch.arange(6).view(2, 3).t(), "e": torch.zeros(0, 4)}  # d is not contiguous
    write_safetensors(str(tmp_path / "x.safetensors"), sd)
    path = str(tmp_path / "x.safetensors")
    for back in (load_file(path), read_safetensors(path)):
        assert set(back) == set(sd) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype
                                            for k, v in sd.items())


def test_a_checkpoint_carries_its_config_and_tokenizer(tmp_path):
    model = trained_like(score_head=True)
    record = model_record(model, "words", ["good", "bad"]) | dict(step=7)
    save_checkpoint(record, str(tmp_path / "m.pt"))
    saved = load_checkpoint(str(tmp_path / "m.pt"))  # weights_only: no code unpickled
    back, tokenizer, words = model_from_record(saved)
    assert back.config == model.config
    assert (tokenizer, words, saved["step"]) == ("words", ["good", "bad"], 7)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
