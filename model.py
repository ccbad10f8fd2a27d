"""
GPT-2, written out plainly (after nanoGPT), plus the tokenizers nanoDPO uses.

- `model(idx)` returns the final hidden states (after ln_f), shape (B, T, C). Training never
  computes the (B, T, V) logits: the fused log-prob kernel in kernels/ takes the hidden states
  and `model.lm_head.weight` instead. Full logits are computed only where sampling needs them.
- `GPT.from_pretrained` loads the real GPT-2 weights (downloaded once into a cache folder) or a
  local directory in the Hugging Face layout, without ever unpickling arbitrary objects.
- `generate` samples a batch of prompts of different lengths with a KV cache.
- An optional scalar head reads the hidden state of the last real token (the sentiment
  classifier that serves as the ground-truth reward).
- `save_hf` writes a model as a Hugging Face GPT-2 folder (the reverse of `from_pretrained`);
  `model_record` is what a checkpoint holds to rebuild its model alone (its config, its tokenizer).
"""
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import urllib.request
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
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
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
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's "gelu_new"


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
        # the MLP reads each position alone: run it on the real ones only (real: their indices in the flat (B*T, C))
        flat = x.flatten(0, 1)
        return flat.index_add(0, real, self.mlp(self.ln_2(flat.index_select(0, real))).to(x.dtype)).view_as(x)


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
        lengths (B,): with right-padded rows, the count of real tokens of each; the MLPs (two thirds of the
        compute) then skip the padding after them, whose states are left unfinished: no real position attends
        to a later one, so theirs are the same."""
        B, T = idx.size()
        start = cache.len if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
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
        """Scalar head on the last real token: h (B, T, C), mask (B, T) right-padded -> (B,) in fp32."""
        last = mask.long().sum(1).clamp(min=1) - 1
        with torch.autocast(h.device.type, enabled=False):  # fp32: in bf16 close rewards would tie
            return self.score_head(h[torch.arange(h.size(0), device=h.device), last].float()).squeeze(-1)

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
            raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds block_size {self.config.block_size}")
        keys = prompt_mask.bool()  # (B, T_so_far) which keys are real
        pos = (keys.long().cumsum(1) - 1).clamp(min=0)  # left padding: the first real token is position 0
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
                tok = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
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

    # ---------------------------------------------------------------- loading GPT-2 weights

    SIZES = {  # the four public GPT-2 checkpoints
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    }

    @classmethod
    def from_pretrained(cls, name_or_dir, cache_dir=None, **overrides):
        """A GPT-2 size by name (downloaded once into cache_dir), or a local directory holding
        config.json and model.safetensors or pytorch_model.bin. overrides: dropout, score_head."""
        if os.path.isdir(name_or_dir):
            with open(os.path.join(name_or_dir, "config.json")) as f:
                hf = json.load(f)
            config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                               n_head=hf["n_head"], n_embd=hf["n_embd"], **overrides)
            st, pt = (os.path.join(name_or_dir, f) for f in ("model.safetensors", "pytorch_model.bin"))
            if os.path.exists(st):
                path, sd = st, read_safetensors(st)
            elif os.path.exists(pt):
                path, sd = pt, torch.load(pt, map_location="cpu", weights_only=True)  # never unpickles code
            else:
                raise FileNotFoundError(f"{name_or_dir} has neither model.safetensors nor pytorch_model.bin")
        elif name_or_dir in cls.SIZES:
            config = GPTConfig(**cls.SIZES[name_or_dir], **overrides)
            path = download_gpt2(name_or_dir, cache_dir)
            sd = read_safetensors(path)
        else:
            raise ValueError(f"unknown model {name_or_dir!r}: expected one of {', '.join(cls.SIZES)} or a directory")
        model = cls(config)
        model.load_hf_state_dict(sd, path)
        return model

    def load_hf_state_dict(self, sd, path):
        """Copy a Hugging Face GPT-2 state dict in, checking that every tensor is there with its shape."""
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        ignored = (".attn.bias", ".attn.masked_bias", "lm_head.weight")  # causal-mask buffers; lm_head is tied to wte
        sd = {k: v for k, v in sd.items() if not k.endswith(ignored)}
        ours = {k.removeprefix("transformer."): p for k, p in self.named_parameters()
                if not k.startswith(("lm_head", "score_head"))}
        unexpected = sorted(set(sd) - set(ours))
        if unexpected:
            print(f"warning: {path} has tensors GPT-2 does not use: {', '.join(unexpected[:5])}", file=sys.stderr)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k, p in ours.items():
                if k not in sd:
                    raise KeyError(f"checkpoint {path} has no tensor {k!r}")
                w = sd[k].t() if k.endswith(conv1d) else sd[k]  # HF's Conv1D stores (in, out)
                if w.shape != p.shape:
                    raise ValueError(f"tensor {k!r} in {path} has shape {tuple(sd[k].shape)}, "
                                     f"expected {tuple(p.shape[::-1] if k.endswith(conv1d) else p.shape)}")
                p.copy_(w)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A safetensors file: 8-byte little-endian header size, a JSON header, then raw tensor bytes."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        body = bytearray(data[8 + n:])
        sd = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            count = math.prod(info["shape"])
            if not 0 <= begin <= end <= len(body) or end - begin != count * dtype.itemsize:
                raise ValueError(f"tensor {name!r} lies outside the file or has the wrong byte count")
            flat = (torch.frombuffer(body, dtype=dtype, count=count, offset=begin) if count
                    else torch.empty(0, dtype=dtype))  # frombuffer refuses count 0: an empty tensor is made, not read
            sd[name] = flat.view(info["shape"])
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
    return sd


def default_cache_dir():
    return os.environ.get("NANODPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanodpo"))


class KeepLinkedEtag(urllib.request.HTTPRedirectHandler):
    """Redirects followed as urllib does, keeping the Hugging Face hub's X-Linked-Etag, the sha256 of the file,
    which only the hub's redirect carries: the CDN it points to answers with an ETag of its own (another hash
    for files stored in Xet). The final response gets the header."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.linked_etag = headers.get("X-Linked-Etag") or getattr(req, "linked_etag", None)
        return new

    def http_response(self, req, response):
        if getattr(req, "linked_etag", None) and "X-Linked-Etag" not in response.headers:
            response.headers["X-Linked-Etag"] = req.linked_etag
        return response

    https_response = http_response


def open_url(url, timeout):
    """urllib's urlopen(url), but with the hub's X-Linked-Etag kept (KeepLinkedEtag)."""
    return urllib.request.build_opener(KeepLinkedEtag()).open(url, timeout=timeout)


def download(url, path):
    """Download url to path with a progress line. The bytes go to path.part, are checked against the
    server's size (and sha256, when the hub sends it as X-Linked-Etag), and only then renamed to path."""
    tmp = path + ".part"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with open_url(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            etag = (r.headers.get("X-Linked-Etag") or "").strip('"')
            sha, got = hashlib.sha256(), 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                sha.update(chunk)
                got += len(chunk)
                print(f"\r{os.path.basename(path)}: {got / 1e6:.0f} / {total / 1e6:.0f} MB", end="", file=sys.stderr)
            print(file=sys.stderr)
        if total and got != total:
            raise IOError(f"download of {url} stopped at {got} of {total} bytes")
        if len(etag) == 64 and sha.hexdigest() != etag:
            raise IOError(f"download of {url} has sha256 {sha.hexdigest()}, expected {etag}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def download_gpt2(name, cache_dir=None):
    """Path of the cached model.safetensors of a GPT-2 size, downloading it on first use."""
    path = os.path.join(cache_dir or default_cache_dir(), name, "model.safetensors")
    if not os.path.exists(path):
        url = f"https://huggingface.co/{name}/resolve/main/model.safetensors"
        try:
            download(url, path)
        except OSError as e:
            raise UsageError(f"could not download the {name} weights ({e}). Fetch {url} on a machine "
                             f"with internet and put it at {path}, or pass a local Hugging Face directory.") from e
    return path


# ---------------------------------------------------------------- tokenizers

class WordTokenizer:
    """Whole words and single punctuation marks as tokens, then <|endoftext|>: the tiny preset's language, so
    that what its models write can be read. The vocabulary is given (data/tiny/prepare.py derives it from the
    generator's word lists); a word outside it is an error. decode puts a space between words, none before
    . , ! : ) and none after (, which rebuilds the generator's text exactly."""
    PATTERN = r"\w+|[^\w\s]"

    def __init__(self, words):
        self.words = list(words) + ["<|endoftext|>"]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.eot_token, self.n_vocab = len(self.words) - 1, len(self.words)

    def encode_ordinary(self, text):
        try:
            return [self.ids[w] for w in re.findall(self.PATTERN, text)]
        except KeyError as e:
            raise ValueError(f"{e.args[0]!r} is not in the tokenizer's vocabulary of {self.n_vocab - 1} words") from None

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
            return tiktoken.get_encoding("gpt2")  # fetched once, then cached under $TIKTOKEN_CACHE_DIR
        except OSError as e:
            raise UsageError(f"could not fetch GPT-2's BPE files for tiktoken ({type(e).__name__}): run once with "
                             f"internet, or set TIKTOKEN_CACHE_DIR to a folder that holds them") from e
    if name == "bytes":
        return tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    if name == "words" and words is not None:
        return WordTokenizer(words)
    raise ValueError(f"unknown tokenizer {name!r}: expected 'gpt2', 'bytes', or 'words' with its word list")


# ------------------------------------------------------------ a Hugging Face folder out; checkpoints

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


SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(path, tensors, metadata=None):
    """The reverse of read_safetensors: 8-byte little-endian header size, the JSON header (names,
    dtypes, shapes, byte offsets; padded with spaces to 8 bytes, as the format recommends), the raw
    bytes."""
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = dict(dtype=SAFETENSORS_NAMES[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + n])
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():  # the bytes as in memory: little-endian where torch runs
            f.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def hf_config(config, tokenizer, words=()):
    """config.json of a GPT2LMHeadModel of this shape; the tokenizer nanoDPO trained with is named
    under "nanodpo" (transformers keeps unknown keys). Every tokenizer here has <|endoftext|>
    last."""
    eot = config.vocab_size - 1
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=config.vocab_size,
                n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
                n_head=config.n_head, n_inner=None, activation_function="gelu_new",
                layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True,
                nanodpo=dict(tokenizer=tokenizer, words=list(words),
                             note=TOKENIZER_NOTES.get(tokenizer, "")))


TOKENIZER_NOTES = {
    "gpt2": "GPT-2's BPE: Hugging Face's AutoTokenizer.from_pretrained('gpt2'), tiktoken's 'gpt2'",
    "bytes": "a token per UTF-8 byte, <|endoftext|> 256 (nanoDPO's model.get_tokenizer('bytes'))",
    "words": "the words below as ids 0.., <|endoftext|> last (nanoDPO's model.WordTokenizer)",
}


def save_hf(model, folder, tokenizer, words=()):
    """Write model as a Hugging Face GPT-2 folder, config.json + model.safetensors, that
    transformers.GPT2LMHeadModel.from_pretrained loads (and GPT.from_pretrained): the names prefixed
    "transformer.", the four Conv1D weights transposed to (in, out) as load_hf_state_dict undoes
    them, lm_head left out (tied to wte). A scalar head is not written: a language-model folder has
    no place for it. The folder is written whole beside its path, then renamed; an earlier export
    there is replaced, anything else refused. Returns the folder."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {"transformer." + k.removeprefix("transformer."): (v.t() if k.endswith(conv1d) else v)
          for k, v in model.state_dict().items() if not k.startswith(("lm_head", "score_head"))}
    folder = os.path.abspath(folder)
    old = os.path.join(folder, "config.json")
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder) and not (
            os.path.exists(old) and "nanodpo" in json.load(open(old)))):
        raise UsageError(f"{folder} exists and is not a nanoDPO export: give a new folder")
    tmp = f"{folder}.{os.getpid()}.tmp"
    os.makedirs(tmp)
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), sd)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(model.config, tokenizer, words), f, indent=1)
        if os.path.exists(folder):  # aside, then the new one in, then the old one gone
            os.replace(folder, tmp + ".old")
        os.replace(tmp, folder)
    finally:
        for t in (tmp, tmp + ".old"):
            if os.path.exists(t):
                shutil.rmtree(t)
    return folder
