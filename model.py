"""
GPT-2, written out plainly (after nanoGPT), plus the tokenizers nanoDPO uses.

- `model(idx)` returns the final hidden states (after ln_f), shape (B, T, C). Training never
  computes the (B, T, V) logits: the fused log-prob kernel in kernels/ takes the hidden states
  and `model.lm_head.weight` instead. Full logits are computed only where sampling needs them.
- `generate` samples a batch of prompts of different lengths with a KV cache.
- An optional scalar head reads the hidden state of the last real token (the sentiment
  classifier that serves as the ground-truth reward).
- `model_record` is what a checkpoint holds to rebuild its model alone (its config, its
  tokenizer).
The real GPT-2 weights, and a Hugging Face folder in or out, are hf.py's (which imports this
file): `hf.from_pretrained("gpt2")`, `hf.save_hf(model, folder, tokenizer)`.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UsageError


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for DPO: the policy and the reference must see the same function
    score_head: bool = False  # add a scalar head (the sentiment classifier)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x, mask=None, cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nh, T_past + T, hs)
        # without an explicit mask every row is real (right padding only pads the end): plain causal
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None, layer=0, real=None):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        if real is None:
            return x + self.mlp(self.ln_2(x))
        # the MLP reads each position alone: run it on the real ones only (real: their indices in
        # the flat (B*T, C))
        flat = x.flatten(0, 1)
        return flat.index_add(
            0, real, self.mlp(self.ln_2(flat.index_select(0, real))).to(x.dtype)).view_as(x)


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.len = 0  # positions filled; advanced by GPT.forward once every layer has appended

    def append(self, layer, k, v):
        end = self.len + k.size(2)
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def draw(probs, generator=None):
    """One token per row of probs (B, V) >= 0, by inverse CDF: the first token whose cumulative
    probability reaches u ~ U(0, total]. One uniform per row, where torch.multinomial draws one per
    token (15 times slower here, on a CPU). The sums are in float64: in fp32 over GPT-2's 50,257
    tokens, rounding moves probability between tokens. A token of probability 0 is never drawn, even
    where a parallel cumsum (CUDA's) rounds a step below 0: its step is set to exactly 0."""
    total = probs.sum(-1)
    if not bool((torch.isfinite(total) & (total > 0)).all()):  # what multinomial would refuse too
        raise FloatingPointError("draw: a row of probabilities is not finite or sums to 0")
    cdf = torch.where(probs > 0, probs.double().cumsum(-1), 0.0).cummax(-1).values
    u = (1 - torch.rand(probs.size(0), 1, generator=generator, device=probs.device,
                        dtype=cdf.dtype)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1)


def left_pad(prompts, pad):
    """Token lists of different lengths -> what generate takes: idx (B, T) left-padded with `pad`,
    and mask (B, T), True on the real tokens."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p, dtype=torch.long), True
    return idx, mask


class GPT(nn.Module):
    SIZES = {  # the four public GPT-2 checkpoints (hf.from_pretrained loads them by name)
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    }

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.score_head = nn.Linear(config.n_embd, 1) if config.score_head else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, pos=None, mask=None, cache=None, lengths=None):
        """idx (B, T) token ids -> hidden states (B, T, C) after ln_f.
        pos (B, T) positions (default 0..T-1); mask (B, 1, T, T_keys) boolean, True = may attend;
        cache: a KVCache that this call appends to.
        lengths (B,): with right-padded rows, the count of real tokens of each; the MLPs (two thirds
        of the compute) then skip the padding after them, whose states are left unfinished: no real
        position attends to a later one, so theirs are the same."""
        B, T = idx.size()
        start = cache.len if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device).expand(B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        real = None  # the flat indices of the real positions, (n_real,)
        if lengths is not None:
            real = (torch.arange(T, device=idx.device) < lengths[:, None]).flatten().nonzero()[:, 0]
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i, real)
        if cache is not None:
            cache.len += T
        return self.transformer.ln_f(x)

    def score(self, h, mask):
        """Scalar head on the last real token: h (B, T, C), mask (B, T) right-padded -> (B,) in
        fp32."""
        last = mask.long().sum(1).clamp(min=1) - 1
        with torch.autocast(h.device.type, enabled=False):  # fp32: in bf16 close rewards would tie
            return self.score_head(
                h[torch.arange(h.size(0), device=h.device), last].float()).squeeze(-1)

    @torch.no_grad()
    def calibrate_score(self, scale, shift):
        """score(h) becomes scale * score(h) + shift, folded into the scalar head (r*'s Platt
        scaling: calibration.calibrate)."""
        self.score_head.weight.mul_(scale)
        self.score_head.bias.mul_(scale).add_(shift)

    def values(self, h):
        """The scalar head at every position (PPO's value head): h (B, T, C) -> (B, T) in fp32, as
        score."""
        with torch.autocast(h.device.type, enabled=False):
            return self.score_head(h.float()).squeeze(-1)

    @torch.no_grad()
    def generate(self, idx, prompt_mask, max_new_tokens, temperature=1.0, top_k=None, eos=None,
                 generator=None, use_cache=True):
        """Sample continuations of a batch of left-padded prompts.
        idx (B, T) prompt ids, left-padded; prompt_mask (B, T) True on real tokens.
        temperature 0 means greedy. A row stops after it samples eos.
        Returns new (B, T_new) ids and their mask (B, T_new): True up to and including EOS."""
        B, T = idx.size()
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds "
                             f"block_size {self.config.block_size}")
        keys = prompt_mask.bool()  # (B, T_so_far) which keys are real
        # left padding: the first real token is position 0
        pos = (keys.long().cumsum(1) - 1).clamp(min=0)
        next_pos = keys.long().sum(1)  # (B,)
        # keys and values come out of c_attn in the autocast dtype
        amp = torch.is_autocast_enabled(idx.device.type)
        kv_dtype = torch.get_autocast_dtype(idx.device.type) if amp else self.lm_head.weight.dtype
        cache = None
        if use_cache:
            cache = KVCache(self.config, B, T + max_new_tokens, idx.device, kv_dtype)
        logits_dtype = torch.promote_types(self.lm_head.weight.dtype, torch.float32)
        seq, x, x_pos = idx, idx, pos
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        new, new_mask = [], []
        for _ in range(max_new_tokens):
            Tq, Tk = x.size(1), keys.size(1)
            causal = torch.ones(Tq, Tk, dtype=torch.bool, device=idx.device).tril(Tk - Tq)
            # a padding query may see itself, so that no row of the softmax is empty (NaN)
            own = torch.zeros_like(causal)
            own[:, Tk - Tq:] = torch.eye(Tq, dtype=torch.bool, device=idx.device)
            mask = (keys[:, None, None, :] & causal) | own  # (B, 1, Tq, Tk)
            h = self(x, x_pos, mask, cache)
            # (B, V): full logits only for the last position, in fp32 even under autocast:
            # rounded to bf16, GPT-2's logits (-60 to -75) would move by steps of 0.25 to 0.5,
            # and samples with them
            with torch.autocast(idx.device.type, enabled=False):
                logits = F.linear(h[:, -1].to(logits_dtype), self.lm_head.weight.to(logits_dtype))
            if temperature == 0:
                tok = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                tok = draw(F.softmax(logits, -1), generator)
            tok = tok.masked_fill(done, eos if eos is not None else 0)
            new.append(tok)
            new_mask.append(~done)
            if eos is not None:
                done = done | (tok == eos)
            keys = torch.cat([keys, torch.ones(B, 1, dtype=torch.bool, device=idx.device)], 1)
            seq = torch.cat([seq, tok[:, None]], 1)
            if use_cache:
                x, x_pos = tok[:, None], next_pos[:, None]
            else:
                x, x_pos = seq, torch.cat([x_pos, next_pos[:, None]], 1)
            next_pos = next_pos + 1
            if done.all():
                break
        return torch.stack(new, 1), torch.stack(new_mask, 1)



# ---------------------------------------------------------------- tokenizers

class WordTokenizer:
    """Whole words and single punctuation marks as tokens, then <|endoftext|>: the tiny preset's
    language, so that what its models write can be read. The vocabulary is given
    (data/tiny/prepare.py derives it from the generator's word lists); a word outside it is an
    error. decode puts a space between words, none before . , ! : ) and none after (, which
    rebuilds the generator's text exactly."""
    PATTERN = r"\w+|[^\w\s]"

    def __init__(self, words):
        self.words = list(words) + ["<|endoftext|>"]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.eot_token, self.n_vocab = len(self.words) - 1, len(self.words)

    def encode_ordinary(self, text):
        try:
            return [self.ids[w] for w in re.findall(self.PATTERN, text)]
        except KeyError as e:
            raise ValueError(f"{e.args[0]!r} is not in the tokenizer's vocabulary of "
                             f"{self.n_vocab - 1} words") from None

    def encode_ordinary_batch(self, texts):
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids):
        text = ""
        for w in (self.words[i] for i in ids):
            text += w if not text or w in ".,!:)" or text.endswith("(") else " " + w
        return text


def get_tokenizer(name, words=None):
    """'gpt2': tiktoken's GPT-2 BPE (fetched by tiktoken on first use).
    'bytes': an offline byte-level encoding, 256 bytes + <|endoftext|> = 256.
    'words': a WordTokenizer over `words` (the tiny preset's)."""
    import tiktoken
    if name == "gpt2":
        try:
            # fetched once, then cached under $TIKTOKEN_CACHE_DIR
            return tiktoken.get_encoding("gpt2")
        except OSError as e:
            raise UsageError(f"could not fetch GPT-2's BPE files for tiktoken "
                             f"({type(e).__name__}): run once with internet, or set "
                             f"TIKTOKEN_CACHE_DIR to a folder that holds them") from e
    if name == "bytes":
        return tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]",
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    if name == "words" and words is not None:
        return WordTokenizer(words)
    raise ValueError(f"unknown tokenizer {name!r}: expected 'gpt2', 'bytes', or 'words' with its "
                     f"word list")


# ------------------------------------------------------------ checkpoints

def model_record(model, tokenizer, words=()):
    """What a checkpoint holds so that the model is rebuilt from it alone: the weights, the
    GPTConfig and the tokenizer's name (and a words tokenizer's list), for
    data.corpus.save_checkpoint. A loop adds its own entries (the optimizer, the step) beside
    these."""
    return dict(model=model.state_dict(), config=vars(model.config).copy(),
                tokenizer=dict(name=tokenizer, words=list(words)))


def model_from_record(record, **overrides):
    """The GPT of a model_record (a dict from data.corpus.load_checkpoint), its weights loaded;
    overrides: dropout. Returns (model, tokenizer name, words)."""
    config = GPTConfig(**(record["config"] | overrides))
    model = GPT(config)
    model.load_state_dict(record["model"])
    return model, record["tokenizer"]["name"], record["tokenizer"]["words"]
