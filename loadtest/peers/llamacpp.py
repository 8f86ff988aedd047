"""llama.cpp as a benchmark peer: its binaries, GGUF files of our checkpoints, and its tools' commands.

The binaries (`llama-server`, `llama-bench`, `llama-quantize`, `llama-perplexity`) are built once
by scripts/build_llamacpp.sh from the vendored llama.cpp tree of the `llama-cpp-python` source
distribution (PyPI) into ~/.cache/moe-serve/llama.cpp (LLAMACPP_HOME): `build/bin/` and the
tree in `src/vendor/llama.cpp` (its `convert_hf_to_gguf.py` and `gguf-py`). `ensure_built()`
runs the script when they are missing (about 15 minutes on 2 cores).

GGUF conversion (`convert`): llama.cpp's own `convert_hf_to_gguf.py`, run through a small wrapper.
The converter names the BPE pre-tokenizer (`tokenizer.ggml.pre`) by hashing what the
tokenizer makes of a fixed text, and refuses a hash it does not know; our test tokenizers
(loadtest/checkpoints.py `save_tokenizer`, the bundled tiny-mixtral's) are byte-level BPE with
the GPT-2 split regex (`pre_tokenizers.ByteLevel(use_regex=True)`), which is what llama.cpp's
"gpt-2" pre-tokenizer implements. The wrapper checks that in tokenizer.json and then answers
"gpt-2" for the unknown hash (it replaces `TextModel.get_vocab_base_pre` in the imported
converter; the tree is not edited); any other tokenizer still fails as upstream does. The
wrapper also lets a checkpoint without tokenizer.model skip the SentencePiece attempt without
the `sentencepiece` package (the converter imports it before it looks for the file).
Quantized files come from `llama-quantize` (Q8_0, Q4_0) of the F16 file.

Command builders and output parsers are pure functions (tested in the default suite).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HOME = Path(os.environ.get("LLAMACPP_HOME", Path.home() / ".cache" / "moe-serve" / "llama.cpp"))
BUILD_SCRIPT = REPO / "scripts" / "build_llamacpp.sh"
TOOLS = ("llama-server", "llama-bench", "llama-quantize", "llama-perplexity")
QUANT_TYPES = ("Q8_0", "Q4_0")
# moe-serve's --quantization format for each llama.cpp type of the same bits (None: the float dtype)
MATCHING = {"F16": None, "Q8_0": "int8", "Q4_0": "int4"}


def bin_dir(home: Path = HOME) -> Path:
    return home / "build" / "bin"


def src_dir(home: Path = HOME) -> Path:
    return home / "src" / "vendor" / "llama.cpp"


def binary(name: str, home: Path = HOME) -> Path:
    return bin_dir(home) / name


def built(home: Path = HOME) -> bool:
    return all(os.access(binary(t, home), os.X_OK) for t in TOOLS) and (src_dir(home) / "convert_hf_to_gguf.py").exists()


def ensure_built(home: Path = HOME, python: str = sys.executable) -> Path:
    """The bin directory, building llama.cpp with scripts/build_llamacpp.sh first if needed."""
    if not built(home):
        print(f"[llama.cpp] not built in {home}: running {BUILD_SCRIPT} (about 15 minutes on 2 cores)", flush=True)
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, env={**os.environ, "LLAMACPP_HOME": str(home),
                                                                    "PYTHON": python})
    if not built(home):
        raise RuntimeError(f"llama.cpp build in {home} is incomplete (need {', '.join(TOOLS)})")
    return bin_dir(home)


def version(home: Path = HOME) -> str | None:
    """llama.cpp's build number and commit (`llama-bench --version`-style line from llama-server)."""
    try:
        r = subprocess.run([str(binary("llama-server", home)), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(r.stdout + r.stderr)


def parse_version(text: str) -> str | None:
    """`--version` output -> "0.5.0-dev, commit 0c1e570" (older builds: "b4567, commit abcdef0")."""
    m = re.search(r"version:\s*(\S+)\s*\((?:build\s*\d+,\s*)?(?:commit\s*)?(\w+)\)", text)
    if not m:
        return None
    ver = m.group(1) if not m.group(1).isdigit() else f"b{m.group(1)}"
    return f"{ver}, commit {m.group(2)}"


# ---------------------------------------------------------------- conversion

def byte_level_gpt2(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a tokenizer.json is byte-level BPE with the GPT-2 split regex (llama.cpp's "gpt-2")."""
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        return False
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return (len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True))


WRAPPER = r'''
import os, runpy, sys
src = sys.argv.pop(1)  # the tree; it and its gguf-py are on PYTHONPATH (convert_command's env)
import conversion.base as base
original = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        fallback = os.environ.get("MOE_SERVE_GGUF_PRE")
        if not fallback:
            raise
        print(f"[llama.cpp] unknown BPE pre-tokenizer hash: tokenizer.ggml.pre = {fallback!r} "
              "(byte-level BPE with the GPT-2 regex, checked in tokenizer.json)", flush=True)
        return fallback

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sentencepiece_vocab = base.TextModel._set_vocab_sentencepiece

def _set_vocab_sentencepiece(self, *args, **kwargs):
    # the converter imports sentencepiece before it looks for tokenizer.model: without the file,
    # fail as it does when the file is missing (the caller then tries the HF / GPT-2 vocabularies)
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(self.dir_model / "tokenizer.model")
    return sentencepiece_vocab(self, *args, **kwargs)

base.TextModel._set_vocab_sentencepiece = _set_vocab_sentencepiece
sys.argv[0] = os.path.join(src, "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def convert_command(hf_dir: str | Path, out: str | Path, outtype: str = "f16", *, python: str = sys.executable,
                    home: Path = HOME) -> list[str]:
    """The wrapped converter's command; run it with `convert_env` (the tree on PYTHONPATH)."""
    return [python, "-c", WRAPPER, str(src_dir(home)), str(hf_dir), "--outfile", str(out), "--outtype", outtype]


def convert_env(home: Path = HOME) -> dict[str, str]:
    src = src_dir(home)
    return {"PYTHONPATH": os.pathsep.join([str(src), str(src / "gguf-py")])}


def convert(hf_dir: str | Path, out: str | Path, outtype: str = "f16", *, python: str = sys.executable,
            home: Path = HOME) -> Path:
    """HF checkpoint -> GGUF with llama.cpp's converter (the gpt-2 pre-tokenizer for our test tokenizers)."""
    out = Path(out)
    if out.exists():
        return out
    env = dict(os.environ) | convert_env(home)
    tj = Path(hf_dir) / "tokenizer.json"
    if tj.exists() and byte_level_gpt2(json.loads(tj.read_text())):
        env["MOE_SERVE_GGUF_PRE"] = "gpt-2"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    cmd = convert_command(hf_dir, tmp, outtype, python=python, home=home)
    print(f"[llama.cpp] converting {hf_dir} -> {out} ({outtype})", flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    tmp.rename(out)
    return out


def quantize_command(src: str | Path, out: str | Path, qtype: str, threads: int, home: Path = HOME) -> list[str]:
    return [str(binary("llama-quantize", home)), str(src), str(out), qtype, str(threads)]


def quantize(src: str | Path, out: str | Path, qtype: str, threads: int = 2, home: Path = HOME) -> Path:
    out = Path(out)
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".part")
    print(f"[llama.cpp] llama-quantize {Path(src).name} -> {out.name} ({qtype})", flush=True)
    r = subprocess.run(quantize_command(src, tmp, qtype, threads, home), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-quantize failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    tmp.rename(out)
    return out


def gguf_files(hf_dir: str | Path, out_dir: str | Path, types: tuple[str, ...] = ("F16", *QUANT_TYPES), *,
               threads: int = 2, python: str = sys.executable, home: Path = HOME) -> dict[str, Path]:
    """{type: path} of the checkpoint's GGUF files (F16 converted, the others quantized from it), made once."""
    out_dir = Path(out_dir)
    f16 = convert(hf_dir, out_dir / "model-F16.gguf", "f16", python=python, home=home)
    files = {"F16": f16}
    for t in types:
        if t != "F16":
            files[t] = quantize(f16, out_dir / f"model-{t}.gguf", t, threads, home)
    return {t: files[t] for t in types}


def gguf_info(path: str | Path) -> dict[str, Any]:
    """Weight bytes (tensor data), tensor count and a few metadata values of a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def field(name: str) -> Any:
        f = r.fields.get(name)
        if f is None or not f.data:
            return None
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types and f.types[0].name == "STRING" else v.tolist()[0]

    return {"weight_bytes": int(sum(int(t.n_bytes) for t in r.tensors)), "tensors": len(r.tensors),
            "file_bytes": Path(path).stat().st_size, "pre": field("tokenizer.ggml.pre"),
            "add_bos": field("tokenizer.ggml.add_bos_token"), "bos": field("tokenizer.ggml.bos_token_id"),
            "arch": field("general.architecture")}


# ---------------------------------------------------------------- llama-bench

def bench_command(gguf: str | Path, *, threads: int = 2, reps: int = 3, n_prompt: int = 512, n_gen: int = 128,
                  home: Path = HOME) -> list[str]:
    """llama-bench pp<n_prompt> and tg<n_gen> as JSON (its two tests, run separately)."""
    return [str(binary("llama-bench", home)), "-m", str(gguf), "-t", str(threads), "-r", str(reps),
            "-p", str(n_prompt), "-n", str(n_gen), "-o", "json"]


def parse_bench(text: str) -> dict[str, dict[str, Any]]:
    """llama-bench's JSON -> {"pp512": {"tok_s", "stddev", "samples_ts", ...}, "tg128": {...}}."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON array in llama-bench's output")
    rows = json.loads(text[start:text.rindex("]") + 1])
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        n_p, n_g = int(row.get("n_prompt", 0)), int(row.get("n_gen", 0))
        name = f"pp{n_p}" if n_g == 0 else f"tg{n_g}" if n_p == 0 else f"pp{n_p}+tg{n_g}"
        out[name] = {"tok_s": float(row["avg_ts"]), "stddev": float(row.get("stddev_ts", 0.0)),
                     "samples_ts": [float(x) for x in row.get("samples_ts", [])],
                     "threads": row.get("n_threads"), "type": row.get("type_k") and row.get("model_type"),
                     "model_size": row.get("model_size"), "build": row.get("build_commit")}
    return out


def run_bench(gguf: str | Path, *, threads: int = 2, reps: int = 3, n_prompt: int = 512, n_gen: int = 128,
              home: Path = HOME, timeout: float = 3600) -> dict[str, dict[str, Any]]:
    cmd = bench_command(gguf, threads=threads, reps=reps, n_prompt=n_prompt, n_gen=n_gen, home=home)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return parse_bench(r.stdout)


# ---------------------------------------------------------------- llama-server

def server_command(gguf: str | Path, port: int, *, parallel: int = 16, threads: int = 2, ctx_per_slot: int = 512,
                   alias: str = "model", home: Path = HOME) -> list[str]:
    """llama-server with `parallel` slots of `ctx_per_slot` tokens each (-c is their sum),
    continuous batching, no prompt cache reuse across requests beyond llama.cpp's defaults."""
    return [str(binary("llama-server", home)), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(parallel), "-c", str(parallel * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
            "--cont-batching", "--alias", alias, "--no-webui", "--log-disable"]


def kv_bytes(cfg: dict[str, Any], tokens: int, elem_bytes: int) -> int:
    """KV-cache bytes of `tokens` token slots for an HF config (K and V of every layer)."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * elem_bytes * tokens


def rss_kib(pid: int) -> dict[str, int | None]:
    """VmRSS and VmHWM (peak) of a process, KiB (/proc/PID/status)."""
    out: dict[str, int | None] = {"VmRSS": None, "VmHWM": None}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


# ---------------------------------------------------------------- llama-perplexity

def perplexity_command(gguf: str | Path, text_file: str | Path, *, ctx: int = 256, threads: int = 2,
                       batch: int | None = None, logits_file: str | Path | None = None,
                       home: Path = HOME) -> list[str]:
    """llama-perplexity over a text file: chunks of `ctx` tokens (BOS put first where the vocab
    adds one), the second half of each chunk scored. `logits_file` (--kl-divergence-base) also
    saves the chunks' token ids (read with `read_logits_tokens`)."""
    cmd = [str(binary("llama-perplexity", home)), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx),
           "-b", str(batch or ctx), "-t", str(threads), "-tb", str(threads)]
    if logits_file is not None:
        cmd += ["--kl-divergence-base", str(logits_file)]
    return cmd


_PPL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_CHUNKS_RE = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


def parse_perplexity(text: str) -> dict[str, float | int]:
    """llama-perplexity's log -> {"perplexity", "stderr", "chunks", "ctx"}."""
    m = _PPL_RE.search(text)
    if not m:
        raise ValueError("no 'Final estimate' in llama-perplexity's output")
    out: dict[str, float | int] = {"perplexity": float(m.group(1)), "stderr": float(m.group(2))}
    c = _CHUNKS_RE.search(text)
    if c:
        out["chunks"], out["ctx"] = int(c.group(1)), int(c.group(2))
    return out


def read_logits_tokens(path: str | Path) -> tuple[int, int, list[int]]:
    """(n_ctx, n_chunk, token ids) from a llama-perplexity --kl-divergence-base file's header:
    "_logits_", n_ctx, n_vocab, n_chunk (int32 each), then n_chunk * n_ctx int32 token ids."""
    import numpy as np

    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{path}: not a llama-perplexity logits file")
        n_ctx, _n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32).tolist()
        ids = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32).tolist()
    return n_ctx, n_chunk, ids


EXIT_DELAY_C = "#include <unistd.h>\n__attribute__((destructor)) static void moe_serve_exit_delay(void) { usleep(300000); }\n"


def exit_delay_library(home: Path = HOME) -> Path | None:
    """A tiny LD_PRELOAD library that waits 0.3 s at exit. llama.cpp's tools log through a
    worker thread that is never joined (common/log.cpp: the logger is a leaked static), so the
    last lines (llama-perplexity's "Final estimate") are sometimes lost when the process exits
    on a busy machine; the pause lets the thread drain its queue. None where cc fails."""
    lib = home / "build" / "moe_serve_exit_delay.so"
    if not lib.exists():
        c = lib.with_suffix(".c")
        try:
            c.write_text(EXIT_DELAY_C)
            subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(c)], check=True,
                           capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
    return lib


def run_perplexity(gguf: str | Path, text_file: str | Path, *, ctx: int = 256, threads: int = 2,
                   home: Path = HOME, timeout: float = 3600, tries: int = 3) -> dict[str, Any]:
    cmd = perplexity_command(gguf, text_file, ctx=ctx, threads=threads, home=home)
    lib = exit_delay_library(home)
    env = dict(os.environ) | ({"LD_PRELOAD": str(lib)} if lib else {})
    for attempt in range(tries):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"llama-perplexity failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
        try:
            return parse_perplexity(r.stdout + r.stderr) | {"command": cmd, "attempts": attempt + 1}
        except ValueError:
            if attempt == tries - 1:
                raise
            print("[llama.cpp] llama-perplexity's final line was lost at exit: running it again", flush=True)
    raise AssertionError("unreachable")


def perplexity_tokens(gguf: str | Path, text_file: str | Path, dump: str | Path, *, ctx: int = 256,
                      threads: int = 2, home: Path = HOME, timeout: float = 3600) -> tuple[int, int, list[int]]:
    """(n_ctx, n_chunk, ids): the token ids llama-perplexity scores, from its --kl-divergence-base
    dump (a pass of its own: in that mode it prints no final estimate)."""
    cmd = perplexity_command(gguf, text_file, ctx=ctx, threads=threads, logits_file=dump, home=home)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    try:
        return read_logits_tokens(dump)
    finally:
        Path(dump).unlink(missing_ok=True)
