"""hf.py: Hugging Face folders in (every tensor checked, bad files refused), the safetensors reader,
and the download of GPT-2's weights (all or nothing, checked against the hub's sha256), offline.

    python -m pytest tests/test_hf.py      (CPU; a few seconds)
"""
import hashlib
import http.server
import io
import json
import os
import struct
import threading
import urllib.error

import pytest
import torch

import hf
from data.corpus import UsageError
from hf import from_pretrained, read_safetensors
from model import GPT, GPTConfig
from test_model import hf_model, save


# ---------------------------------------------------------------- bad input
def test_missing_tensor(tmp_path):
    path = save(hf_model(), str(tmp_path), "bin")
    sd = torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
    del sd["transformer.h.1.mlp.c_fc.weight"]
    torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(KeyError, match=r"pytorch_model.bin has no tensor 'h.1.mlp.c_fc.weight'"):
        from_pretrained(path)


def test_wrong_shape(tmp_path):
    path = save(hf_model(), str(tmp_path), "bin")
    sd = torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
    sd["transformer.h.0.ln_1.weight"] = torch.ones(47)
    torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(ValueError, match=r"'h.0.ln_1.weight'.*shape \(47,\), expected \(48,\)"):
        from_pretrained(path)


def test_no_weights_file(tmp_path):
    path = save(hf_model(), str(tmp_path), "safetensors")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        from_pretrained(path)


def test_corrupt_safetensors(tmp_path):
    path = save(hf_model(), str(tmp_path), "safetensors")
    st = os.path.join(path, "model.safetensors")
    data = open(st, "rb").read()
    open(st, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
        from_pretrained(path)


def test_safetensors_reader_matches_library(tmp_path):
    save_file = pytest.importorskip("safetensors.torch", reason="comes with transformers (requirements-test.txt)").save_file
    sd = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 2).bfloat16()}
    save_file(sd, str(tmp_path / "x.safetensors"))
    back = read_safetensors(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def write_safetensors(path, tensors):
    """A safetensors file written out by hand: 8-byte little-endian header size, the JSON header (with the
    __metadata__ entry every Hugging Face file has), then the raw bytes."""
    header, body = {"__metadata__": {"format": "pt"}}, b""
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        dtype = {torch.float32: "F32", torch.float16: "F16"}[t.dtype]
        header[name] = dict(dtype=dtype, shape=list(t.shape), data_offsets=[len(body), len(body) + len(data)])
        body += data
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + body)


def test_a_hugging_face_folder_by_hand_loads_its_weights(tmp_path):
    """A folder in Hugging Face's GPT-2 layout (config.json, model.safetensors with "transformer." names, Conv1D
    weights stored (in, out), the causal-mask buffers and lm_head.weight): from_pretrained has every weight of the
    model it was written from, and a scalar head only when asked; an empty tensor reads as one, a
    tensor whose byte count is not its shape's is refused."""
    torch.manual_seed(0)
    src = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=8))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: (v.t() if k.endswith(conv1d) else v) for k, v in src.state_dict().items()}
    sd |= {f"transformer.h.{i}.attn.bias": torch.ones(1, 1, 16, 16).tril() for i in range(2)}
    write_safetensors(tmp_path / "model.safetensors", sd)  # lm_head.weight included, as Hugging Face saves it
    config = dict(n_positions=16, vocab_size=50, n_layer=2, n_head=2, n_embd=8)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for score_head in (False, True):
        m = from_pretrained(str(tmp_path), score_head=score_head)
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in src.state_dict().items())
        assert (m.score_head is not None) == score_head
    write_safetensors(tmp_path / "odd.safetensors", {"empty": torch.zeros(0, 3).half(), "w": torch.ones(2, 3)})
    got = read_safetensors(str(tmp_path / "odd.safetensors"))
    assert got["empty"].shape == (0, 3) and got["empty"].dtype == torch.float16
    assert torch.equal(got["w"], torch.ones(2, 3))
    data = bytearray(open(tmp_path / "odd.safetensors", "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n].decode())
    header["w"]["shape"] = [2, 2]  # 16 bytes announced by the shape, 24 by the offsets (all inside the file)
    raw = json.dumps(header).encode()
    open(tmp_path / "odd.safetensors", "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ValueError, match="tensor 'w' lies outside the file or has the wrong byte count"):
        read_safetensors(str(tmp_path / "odd.safetensors"))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'gpt3'"):
        from_pretrained("gpt3")


class FakeResponse(io.BytesIO):
    """An HTTP response that sends `sent` bytes of a file announced as `total` bytes, then fails."""

    def __init__(self, sent, total, fail):
        super().__init__(b"x" * sent)
        self.headers = {"Content-Length": str(total)}
        self.fail = fail

    def read(self, n=-1):
        chunk = super().read(n)
        if not chunk and self.fail:
            raise ConnectionResetError("connection reset by peer")
        return chunk


@pytest.mark.parametrize("fail", [True, False], ids=["connection-reset", "short-read"])
def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch, fail):
    monkeypatch.setattr(hf, "open_url", lambda url, timeout: FakeResponse(100, 1000, fail))
    with pytest.raises(UsageError, match="could not download the gpt2 weights"):
        from_pretrained("gpt2", cache_dir=str(tmp_path))
    assert [f for _, _, files in os.walk(tmp_path) for f in files] == []  # no file a later run could trust


def test_download_completes_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "open_url", lambda url, timeout: FakeResponse(1000, 1000, False))
    path = hf.download_gpt2("gpt2", str(tmp_path))
    assert os.path.getsize(path) == 1000 and not os.path.exists(path + ".part")
    monkeypatch.setattr(hf, "open_url", None)  # a second call must not download
    assert hf.download_gpt2("gpt2", str(tmp_path)) == path


class ChunkedResponse(io.BytesIO):
    """An HTTP response that sends its body in chunks of at most 300 bytes, with the headers given."""

    def __init__(self, body, headers):
        super().__init__(body)
        self.headers = headers

    def read(self, n=-1):
        return super().read(min(n, 300) if n > 0 else 300)


@pytest.mark.parametrize("headers", [{}, {"Content-Length": "1000"}, {"X-Linked-Etag": '"SHA"'}],
                         ids=["no-length", "length", "x-linked-etag"])
def test_download_in_chunks_checks_its_size_and_sha256(tmp_path, monkeypatch, headers):
    """download over a connection that sends 1000 bytes in chunks of 300, into a folder that exists already (as an
    interrupted download leaves it): the file is complete whether or not the server sends its length, and it is
    checked against a sha256 sent as the (quoted) X-Linked-Etag; a wrong one is refused and leaves nothing."""
    body = bytes(range(256)) * 3 + bytes(232)
    sha = hashlib.sha256(body).hexdigest()
    urls = []

    def serve(digest):
        def urlopen(url, timeout):
            urls.append(url)
            return ChunkedResponse(body, {k: v.replace("SHA", digest) for k, v in headers.items()})
        return urlopen
    path = str(tmp_path / "gpt2" / "model.safetensors")
    os.makedirs(os.path.dirname(path))
    monkeypatch.setattr(hf, "open_url", serve(sha))
    hf.download("https://example.org/w", path)
    assert open(path, "rb").read() == body and urls == ["https://example.org/w"]
    if any("SHA" in v for v in headers.values()):
        os.remove(path)
        monkeypatch.setattr(hf, "open_url", serve(hashlib.sha256(b"other").hexdigest()))
        with pytest.raises(IOError, match="has sha256 " + sha):
            hf.download("https://example.org/w", path)
        assert os.listdir(tmp_path / "gpt2") == []


def serve_hub(body, linked):
    """A local stand-in for huggingface.co: /gpt2/resolve/main/model.safetensors answers 302 with the file's
    sha256 `linked` as X-Linked-Etag (quoted, as the hub does) and Location on its CDN, /cdn/<hash>, which sends
    the bytes with an ETag of its own, 64 hex digits too (Xet's hash, not the sha256). Returns (server, url)."""
    xet = hashlib.sha256(b"xet" + body).hexdigest()

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/gpt2/resolve/main/model.safetensors":
                self.send_response(302)
                self.send_header("X-Linked-Etag", f'"{linked}"')
                self.send_header("X-Linked-Size", str(len(body)))
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/cdn/{xet}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == f"/cdn/{xet}":
                self.send_response(200)
                self.send_header("ETag", f'"{xet}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):  # quiet
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/gpt2/resolve/main/model.safetensors"


def test_download_checks_the_sha256_of_the_hubs_redirect_not_the_cdns_etag(tmp_path, monkeypatch):
    """Through a local server that redirects as the hub does: the file is checked against the X-Linked-Etag of
    the redirect, which urllib's own redirect would drop, and the CDN's different ETag is not compared; a linked
    sha256 that the bytes do not have is refused and leaves nothing."""
    for k in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # 127.0.0.1 itself, whatever the machine's
        monkeypatch.delenv(k, raising=False)
    body = os.urandom(3000)
    path = str(tmp_path / "gpt2" / "model.safetensors")
    server, url = serve_hub(body, hashlib.sha256(body).hexdigest())
    try:
        hf.download(url, path)
    finally:
        server.shutdown()
    assert open(path, "rb").read() == body
    wrong = hashlib.sha256(b"other").hexdigest()
    server, url = serve_hub(body, wrong)
    try:
        with pytest.raises(IOError, match=f"has sha256 {hashlib.sha256(body).hexdigest()}, expected {wrong}"):
            hf.download(url, str(tmp_path / "again" / "model.safetensors"))
    finally:
        server.shutdown()
    assert os.listdir(tmp_path / "again") == []


def test_offline_error_says_where_to_put_weights(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(hf, "open_url", offline)
    with pytest.raises(UsageError, match=r"huggingface.co/gpt2/resolve/main/model.safetensors.*put it at"):
        from_pretrained("gpt2", cache_dir=str(tmp_path))
