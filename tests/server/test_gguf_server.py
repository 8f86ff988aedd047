"""A GGUF checkpoint end to end: the bundled model written as a Q8_0 .gguf (as llama.cpp's converter
and quantizer write it, tests/models/gguf_files.py) is served from a directory holding the file;
its weights stay packed (int8, the file's bytes: /version's kernel plan), its tokenizer and chat
template come from the file's metadata, and greedy completions (OpenAI SDK as the client) equal
the Python-side model's on the same file."""

from __future__ import annotations

import httpx

from models import load_model
from models.gguf_loader import GGUFFile, load_tokenizer
from tests.conftest import BUNDLED
from tests.models.gguf_files import Q, write_gguf
from tests.models.simple_runner import greedy_generate
from tests.server.conftest import MAIN_ARGS, ServerProcess

PROMPTS = ["The list data type", "def main():"]


def test_server_on_a_q8_0_gguf(tmp_path):
    model_dir = tmp_path / "tiny-mixtral-gguf"
    model_dir.mkdir()
    path = model_dir / "tiny-mixtral-Q8_0.gguf"
    write_gguf(BUNDLED, path, Q.Q8_0)
    tensors = GGUFFile(str(path)).tensors
    packed = sum(t.data.nbytes for t in tensors.values() if t.kind == "Q8_0")
    server = ServerProcess([*MAIN_ARGS, "--device", "cpu", "--model", str(model_dir)], tmp_path)
    try:
        # while the server starts: the same file in this process, the tokenizer from its metadata
        tok = load_tokenizer(str(path))
        model = load_model(str(path), progress=False)
        ids = greedy_generate(model, [tok(p).input_ids for p in PROMPTS], 8)
        server.wait_ready()
        plan = httpx.get(server.url + "/version", timeout=30).json()["kernel_plan"]
        # every Q8_0 tensor but the token embeddings (an nn.Embedding: dequantized) stays packed
        assert plan["quantization"] == "int8"
        assert plan["quantized_bytes"] == packed - tensors["token_embd.weight"].data.nbytes
        client = server.client()
        name = client.models.list().data[0].id
        outs = [client.completions.create(model=name, prompt=p, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]
        assert outs == [tok.decode(i, skip_special_tokens=True) for i in ids] and any(outs)
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].message.content is not None
        # text naming a token the file's vocabulary lacks is text, not an id past the embeddings
        odd = client.completions.create(model=name, prompt="a <|endoftext|> b", max_tokens=2, temperature=0)
        assert odd.usage.prompt_tokens > 3
    finally:
        assert server.stop() == 0


def test_server_gguf_with_tokenizer_flag(tmp_path):
    """A GGUF file without tokenizer metadata: refused by name without --tokenizer; served with
    `--tokenizer` a directory (the bundled tokenizer: prompts count its tokens)."""
    import pytest
    from transformers import AutoTokenizer

    from models.gguf_loader import GGUFError

    path = tmp_path / "model.gguf"
    write_gguf(BUNDLED, path, Q.Q4_0, tokenizer=False)
    with pytest.raises(GGUFError, match="no tokenizer.*--tokenizer"):
        load_tokenizer(str(path))
    server = ServerProcess([*MAIN_ARGS, "--device", "cpu", "--model", str(path), "--tokenizer", str(BUNDLED)],
                           tmp_path)
    try:
        ref = AutoTokenizer.from_pretrained(str(BUNDLED))
        server.wait_ready()
        client = server.client()
        name = client.models.list().data[0].id
        out = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=3, temperature=0)
        assert out.usage.prompt_tokens == len(ref(PROMPTS[0]).input_ids) and out.usage.completion_tokens == 3
    finally:
        assert server.stop() == 0
