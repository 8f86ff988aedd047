"""`--generation-config`: sampling defaults from the model's generation_config.json, applied as
vLLM applies them, through real servers on copies of the bundled checkpoint."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.api.generation_defaults import (
    GenerationConfigError,
    apply_defaults,
    load_defaults,
)
from server.config import BUNDLED_MODEL
from tests.server.conftest import ServerProcess, start_server

ARGS = ["--max-model-len", "256", "--num-kv-blocks", "128", "--seed", "0", "--drain-timeout", "5"]
BODY = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 12}


def _checkpoint(root: Path, gen: dict) -> Path:
    path = root / "model"
    shutil.copytree(BUNDLED_MODEL, path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 6], **gen}))
    return path


@pytest.fixture(scope="module")
def greedy_by_default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A checkpoint whose generation_config.json makes sampling greedy (top_k 1) at temperature 1.3."""
    root = tmp_path_factory.mktemp("gen-config")
    s = start_server(["--model", str(_checkpoint(root, {"do_sample": True, "temperature": 1.3, "top_k": 1})), *ARGS],
                     root)
    yield s
    assert s.stop() == 0, s.logs()[-3000:]


def _texts(server: ServerProcess, n: int, **extra) -> list[str]:
    out = []
    for _ in range(n):
        r = httpx.post(server.url + "/v1/chat/completions", json={**BODY, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["message"]["content"])
    return out


def test_the_files_defaults_apply_and_requests_override_them(greedy_by_default: ServerProcess) -> None:
    assert "default sampling parameters from " in greedy_by_default.logs()
    assert "temperature=1.3, top_k=1 (a request's own values override them)" in greedy_by_default.logs()
    default = _texts(greedy_by_default, 3)  # no seed: top_k 1 alone makes them equal
    assert len(set(default)) == 1
    # the request's own top_k (0: off) overrides the file's: sampling at temperature 1.3 differs
    assert len(set(_texts(greedy_by_default, 4, top_k=0))) > 1
    # completions too
    texts = {httpx.post(greedy_by_default.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 8},
                        timeout=60).json()["choices"][0]["text"] for _ in range(3)}
    assert len(texts) == 1


def test_a_directory_replaces_the_models_file(tmp_path: Path) -> None:
    """A directory: its file is read instead of the model's (and max_new_tokens caps even an
    explicit max_tokens, as in vLLM)."""
    model = _checkpoint(tmp_path, {"temperature": 1.3, "top_k": 1})
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "top_p": 0.5}))
    s = start_server(["--model", str(model), "--generation-config", str(other), *ARGS], tmp_path)
    try:
        assert f"from {other / 'generation_config.json'}: top_p=0.5, max_tokens=3" in s.logs()
        r = httpx.post(s.url + "/v1/chat/completions", json={**BODY, "max_tokens": 10, "ignore_eos": True},
                       timeout=60).json()
        assert r["usage"]["completion_tokens"] == 3
        assert len(set(_texts(s, 4, max_tokens=10, ignore_eos=True))) > 1  # the model's top_k 1 is not read
    finally:
        assert s.stop() == 0


def test_vllm_means_none_and_hf_defaults_are_no_defaults(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path, {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.9,
                                   "repetition_penalty": 1.05})
    assert load_defaults("vllm", str(model)) == ({}, None)
    # transformers' own defaults (temperature 1.0, top_k 50) are no defaults, as in vLLM's to_diff_dict
    assert load_defaults("auto", str(model)) == ({"top_p": 0.9, "repetition_penalty": 1.05},
                                                 model / "generation_config.json")
    assert apply_defaults({"top_p": None, "temperature": 0.2, "max_tokens": 9}, {"top_p": 0.9, "max_tokens": 4}) == \
        {"top_p": 0.9, "temperature": 0.2, "max_tokens": 4}
    with pytest.raises(GenerationConfigError):
        load_defaults(str(tmp_path / "nowhere"), str(model))
