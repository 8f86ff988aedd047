"""Perplexity side by side: llama-perplexity on F16 / Q8_0 / Q4_0 GGUFs vs moe-serve float32 / int8 / int4.

    python -m loadtest llamacpp --perplexity [--ctx 256] [--formats F16,Q8_0,Q4_0] [--threads 2]

The bundled model (models/checkpoints/tiny-mixtral, trained) on the held-out documents of its
training script, rebuilt as `python -m loadtest quant-quality` rebuilds them
(quant_quality.held_out_docs). llama-perplexity reads text and tokenizes it itself without
parsing special tokens, so the text is the held-out split's plain documents (the chat
renderings, whose role markers are special tokens, are left out), joined by blank lines. Then:

* llama.cpp: the checkpoint converted to F16 with its convert_hf_to_gguf (gpt-2 pre-tokenizer,
  loadtest/peers/llamacpp.py) and quantized with llama-quantize; `llama-perplexity -c CTX` over
  the text: non-overlapping chunks of CTX tokens, BOS put first in each (the GGUF adds a BOS),
  the second half of each chunk scored (CTX/2 - 1 predictions per chunk).
* moe-serve: the same chunks, read back from llama-perplexity's token dump
  (--kl-divergence-base: the very token ids it scored), BOS first, the same positions scored,
  one prefill each through the native model (`load_model`, float32 and `--quantization`
  int8/int4: quant_quality.cross_entropy).
* Verified: the checkpoint's own tokenizer (HF) gives the same ids for the text as llama.cpp's
  (same count, same ids; reported), so both engines see one tokenization.
* quant-quality's own figures (its protocol: 256-token windows of the full token stream with
  the chat documents and BOS/EOS, every position scored) are shown beside them for reference.
"""

from __future__ import annotations

import argparse
import math
import shlex
import tempfile
from pathlib import Path
from typing import Any

from loadtest import output, results

HEADING = "### llama.cpp side by side: perplexity of the bundled model (CPU)"
MOE = {"F16": "float32", "Q8_0": "int8", "Q4_0": "int4"}


def held_out_text(model_dir: Path) -> tuple[str, Any]:
    """(text, HF tokenizer): the held-out plain documents joined by blank lines."""
    from loadtest.benches.quant_quality import held_out_docs

    tok, docs = held_out_docs(model_dir)
    return "\n\n".join(text for text, chat in docs if not chat) + "\n", tok


def hf_ids(tok: Any, text: str, bos: bool) -> list[int]:
    """The text as llama.cpp tokenizes it, with the HF tokenizer: special-token strings in the
    text are plain text (llama-perplexity does not parse them), a BOS first where the GGUF adds one."""
    bt = tok.backend_tokenizer
    if hasattr(bt, "encode_special_tokens"):
        bt.encode_special_tokens = True
    ids = bt.encode(text, add_special_tokens=False).ids
    return ([tok.bos_token_id] if bos else []) + list(ids)


def llama_chunks(ids: list[int], ctx: int, n_chunk: int, bos_id: int | None) -> list[Any]:
    """llama-perplexity's chunks as [ctx] tensors: non-overlapping, BOS replacing the first token."""
    import torch

    out = []
    for i in range(n_chunk):
        c = list(ids[i * ctx:(i + 1) * ctx])
        if bos_id is not None:
            c[0] = bos_id
        out.append(torch.tensor(c))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest llamacpp --perplexity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="F16,Q8_0,Q4_0")
    ap.add_argument("--ctx", type=int, default=256, help="tokens per chunk for both (default: %(default)s, the "
                    "training windows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-quant-quality", action="store_true", help="leave out quant-quality's own protocol")
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled tiny-mixtral)")
    output.add_args(ap)
    args = ap.parse_args(argv)

    import torch

    from loadtest.benches import quant_quality as qq
    from loadtest.checkpoints import CACHE
    from loadtest.peers import llamacpp as L
    from models import load_model

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else qq.CHECKPOINT
    formats = [f for f in args.formats.split(",") if f]
    L.ensure_built()
    ggufs = L.gguf_files(model_dir, CACHE / f"gguf-{model_dir.name}", tuple(formats), threads=args.threads)
    info = L.gguf_info(ggufs[formats[0]])
    text, tok = held_out_text(model_dir)
    result = results.new_result("llamacpp-ppl", argv, vars(args) | {"threads": args.threads},
                                heading=HEADING, section="llamacpp-ppl", packages=("torch", "gguf"))
    result["versions"]["llama.cpp"] = L.version()
    result["command"] = shlex.join(["python", "-m", "loadtest", "llamacpp", "--perplexity", *(argv or [])])
    meas: dict[str, Any] = {"gguf": {f: str(p) for f, p in ggufs.items()}, "text_chars": len(text),
                            "add_bos": info["add_bos"], "pre": info["pre"]}
    with tempfile.TemporaryDirectory(prefix="llamacpp-ppl-") as tmp:
        text_file = Path(tmp) / "held_out.txt"
        text_file.write_text(text)
        llama: dict[str, Any] = {}
        n_ctx, n_chunk, ids = L.perplexity_tokens(ggufs[formats[0]], text_file, Path(tmp) / "tokens.bin",
                                                  ctx=args.ctx, threads=args.threads)
        for fmt in formats:
            llama[fmt] = L.run_perplexity(ggufs[fmt], text_file, ctx=args.ctx, threads=args.threads)
            print(f"llama.cpp {fmt}: PPL {llama[fmt]['perplexity']:.4f} +/- {llama[fmt]['stderr']:.4f} "
                  f"({llama[fmt].get('chunks')} chunks of {llama[fmt].get('ctx')})", flush=True)
    hf = hf_ids(tok, text, bool(info["add_bos"]))
    same = hf[:len(ids)] == ids
    tokens_check = {"llama_tokens_scored_chunks": n_chunk, "ctx": n_ctx, "llama_chunk_tokens": len(ids),
                    "hf_tokens": len(hf), "hf_chunks": len(hf) // n_ctx if n_ctx else None, "same_ids": same}
    meas["tokenization"] = tokens_check
    print(f"tokenization: HF {len(hf)} tokens ({tokens_check['hf_chunks']} chunks of {n_ctx}), llama.cpp's "
          f"{n_chunk} chunks; same ids: {same}", flush=True)
    if not same or tokens_check["hf_chunks"] != n_chunk:
        print("WARNING: the HF tokenizer and llama.cpp tokenize the text differently; moe-serve scores "
              "llama.cpp's ids", flush=True)
    chunks = llama_chunks(ids, n_ctx, n_chunk, info["bos"] if info["add_bos"] else None)
    windows = qq.held_out_windows(model_dir) if not args.skip_quant_quality else None
    moe: dict[str, Any] = {}
    for fmt in formats:
        q = MOE[fmt]
        model = load_model(str(model_dir), dtype="float32", progress=False,
                           quantization=None if q == "float32" else q)
        ce, n = qq.cross_entropy(model, chunks, score_from=n_ctx // 2)
        moe[q] = {"ce_nats": ce, "perplexity": math.exp(ce), "tokens": n}
        if windows is not None:
            ce2, n2 = qq.cross_entropy(model, windows)
            moe[q]["quant_quality"] = {"ce_nats": ce2, "perplexity": math.exp(ce2), "tokens": n2}
        print(f"moe-serve {q}: PPL {math.exp(ce):.4f} over {n} tokens"
              + (f"; quant-quality protocol {moe[q]['quant_quality']['perplexity']:.4f}" if windows is not None
                 else ""), flush=True)
        del model
    meas["llama"], meas["moe_serve"] = llama, moe
    result["measurements"] = meas
    result["summary"]["blocks"] = summary_blocks(result)
    output.finish(result, args)
    return 0


def summary_blocks(result: dict[str, Any]) -> list[dict[str, Any]]:
    m, p = result["measurements"], result["params"]
    col = results.column
    base_l = m["llama"].get("F16", {}).get("perplexity")
    base_m = m["moe_serve"].get("float32", {}).get("perplexity")
    base_q = (m["moe_serve"].get("float32", {}).get("quant_quality") or {}).get("perplexity")
    rows = []
    for fmt, q in MOE.items():
        lv, mv = m["llama"].get(fmt), m["moe_serve"].get(q)
        if not (lv and mv):
            continue
        qq = (mv.get("quant_quality") or {}).get("perplexity")
        rows.append([f"{fmt} / {q}", lv["perplexity"], f"{(lv['perplexity'] / base_l - 1) * 100:+.2f}%" if base_l else "-",
                     mv["perplexity"], f"{(mv['perplexity'] / base_m - 1) * 100:+.2f}%" if base_m else "-",
                     qq if qq else "-", f"{(qq / base_q - 1) * 100:+.2f}%" if qq and base_q else "-"])
    t = m["tokenization"]
    return [
        results.text(
            f"The bundled tiny-mixtral on its held-out plain documents ({m['text_chars']} characters): "
            f"{t['llama_tokens_scored_chunks']} chunks of {t['ctx']} tokens, BOS first, the second half of each scored "
            f"(llama-perplexity's protocol, applied to moe-serve with the same token ids); the HF tokenizer gives "
            f"{'the same' if t['same_ids'] else 'DIFFERENT'} ids ({t['hf_tokens']} tokens). llama.cpp "
            f"{result['versions'].get('llama.cpp')}, {p['threads']} threads. Last columns: quant-quality's own "
            "protocol (256-token windows of the whole held-out stream, every position scored)."),
        results.table(None, [col("llama.cpp / moe-serve weights"), col("llama.cpp PPL", ".4f"), col("vs F16"),
                             col("moe-serve PPL", ".4f"), col("vs float32"), col("moe-serve PPL (quant-quality)", ".4f"),
                             col("vs float32 (quant-quality)")], rows),
        {"kind": "note"},
    ]
