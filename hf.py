"""
GPT-2 weights in and out of Hugging Face's format, for model.py's GPT.

- `from_pretrained` loads the real GPT-2 weights (downloaded once into a cache folder) or a local
  directory in the Hugging Face layout, without ever unpickling arbitrary objects.
- `save_hf` writes a model as a Hugging Face GPT-2 folder, its reverse: transformers'
  GPT2LMHeadModel.from_pretrained loads it.
- Between the two and GPT's own names: `load_hf_state_dict` and `hf_state_dict`, a 20-line
  safetensors reader and its writer, and the download, checked against the sha256 the hub states.
"""
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import urllib.request

import torch

from errors import UsageError
from model import GPT, GPTConfig

# HF's GPT-2 stores these four as Conv1D weights, (in, out): the transposes of nn.Linear's
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ------------------------------------------------------------ in: a name or a folder -> a GPT
def from_pretrained(name_or_dir, cache_dir=None, **overrides):
    """A GPT-2 size by name (GPT.SIZES; downloaded once into cache_dir), or a local directory
    holding config.json and model.safetensors or pytorch_model.bin. overrides: dropout,
    score_head."""
    if os.path.isdir(name_or_dir):
        with open(os.path.join(name_or_dir, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           **overrides)
        st, pt = (os.path.join(name_or_dir, f) for f in ("model.safetensors", "pytorch_model.bin"))
        if os.path.exists(st):
            path, sd = st, read_safetensors(st)
        elif os.path.exists(pt):  # never unpickles code
            path, sd = pt, torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{name_or_dir} has neither model.safetensors nor "
                                    f"pytorch_model.bin")
    elif name_or_dir in GPT.SIZES:
        config = GPTConfig(**GPT.SIZES[name_or_dir], **overrides)
        path = download_gpt2(name_or_dir, cache_dir)
        sd = read_safetensors(path)
    else:
        raise ValueError(f"unknown model {name_or_dir!r}: expected one of {', '.join(GPT.SIZES)} "
                         f"or a directory")
    model = GPT(config)
    load_hf_state_dict(model, sd, path)
    return model


def load_hf_state_dict(model, sd, path):
    """Copy a Hugging Face GPT-2 state dict into model, checking that every tensor is there with
    its shape."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    # the causal-mask buffers; lm_head is tied to wte
    ignored = (".attn.bias", ".attn.masked_bias", "lm_head.weight")
    sd = {k: v for k, v in sd.items() if not k.endswith(ignored)}
    ours = {k.removeprefix("transformer."): p for k, p in model.named_parameters()
            if not k.startswith(("lm_head", "score_head"))}
    unexpected = sorted(set(sd) - set(ours))
    if unexpected:
        print(f"warning: {path} has tensors GPT-2 does not use: {', '.join(unexpected[:5])}",
              file=sys.stderr)
    with torch.no_grad():
        for k, p in ours.items():
            if k not in sd:
                raise KeyError(f"checkpoint {path} has no tensor {k!r}")
            conv1d = k.endswith(CONV1D)
            w = sd[k].t() if conv1d else sd[k]
            if w.shape != p.shape:
                want = tuple(p.shape[::-1] if conv1d else p.shape)
                raise ValueError(f"tensor {k!r} in {path} has shape {tuple(sd[k].shape)}, "
                                 f"expected {want}")
            p.copy_(w)


# ------------------------------------------------------------ safetensors
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def read_safetensors(path):
    """A safetensors file: 8-byte little-endian header size, a JSON header, then raw tensor
    bytes."""
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
                raise ValueError(f"tensor {name!r} lies outside the file or has the wrong "
                                 f"byte count")
            # frombuffer refuses count 0: an empty tensor is made, not read
            flat = (torch.frombuffer(body, dtype=dtype, count=count, offset=begin) if count
                    else torch.empty(0, dtype=dtype))
            sd[name] = flat.view(info["shape"])
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
    return sd


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


# ------------------------------------------------------------ the download
def default_cache_dir():
    return os.environ.get("NANODPO_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "nanodpo"))


class KeepLinkedEtag(urllib.request.HTTPRedirectHandler):
    """Redirects followed as urllib does, keeping the Hugging Face hub's X-Linked-Etag, the sha256
    of the file, which only the hub's redirect carries: the CDN it points to answers with an ETag
    of its own (another hash for files stored in Xet). The final response gets the header."""

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
    """Download url to path with a progress line. The bytes go to path.part, are checked against
    the server's size (and sha256, when the hub sends it as X-Linked-Etag), and only then renamed
    to path."""
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
                print(f"\r{os.path.basename(path)}: {got / 1e6:.0f} / {total / 1e6:.0f} MB",
                      end="", file=sys.stderr)
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
            raise UsageError(f"could not download the {name} weights ({e}). Fetch {url} on a "
                             f"machine with internet and put it at {path}, or pass a local "
                             f"Hugging Face directory.") from e
    return path


# ------------------------------------------------------------ out: a GPT -> a Hugging Face folder
def hf_state_dict(model):
    """The reverse of load_hf_state_dict: model's weights under Hugging Face's names (prefixed
    "transformer.") and layout (the four Conv1D weights transposed to (in, out)), lm_head left
    out (tied to wte), and the scalar head too: a language-model folder has no place for it."""
    return {"transformer." + k.removeprefix("transformer."): (v.t() if k.endswith(CONV1D) else v)
            for k, v in model.state_dict().items() if not k.startswith(("lm_head", "score_head"))}


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
    """Write model as a Hugging Face GPT-2 folder, config.json + model.safetensors (hf_state_dict),
    that transformers.GPT2LMHeadModel.from_pretrained loads (and from_pretrained here). The folder
    is written whole beside its path, then renamed; an earlier export there is replaced, anything
    else refused. Returns the folder."""
    folder = os.path.abspath(folder)
    old = os.path.join(folder, "config.json")
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder) and not (
            os.path.exists(old) and "nanodpo" in json.load(open(old)))):
        raise UsageError(f"{folder} exists and is not a nanoDPO export: give a new folder")
    tmp = f"{folder}.{os.getpid()}.tmp"
    os.makedirs(tmp)
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), hf_state_dict(model))
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
