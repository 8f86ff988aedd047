"""Perplexity of the bundled model on its held-out text: float32 vs the `--quantization` formats.

    python -m loadtest quant-quality [--formats int8,int8_channel,int4,int4_zp] [--max-windows N]

The held-out text is the training script's own split (models/checkpoints/train_tiny.py: ~4% of
the documents, never trained on), rebuilt here step by step as the script builds it (the same
corpus, hash split, chat rendering, seeded shuffles and 256-token windows), tokenized with the
checkpoint's tokenizer. Each window is one prefill through the native model (load_model, the
CPU kernel plan), its next-token cross-entropy summed over every scored token. Reported: mean
cross-entropy (nats/token), perplexity and each format's change against float32, with the
resident bytes of the quantized weights.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

from loadtest import output, results

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "models" / "checkpoints" / "tiny-mixtral"
HEADING = "### Quantized weights: perplexity of the bundled model (CPU)"
SEQ_LEN, SEED = 256, 0  # train_tiny.py's defaults, with which the bundled checkpoint was trained


def held_out_windows(path: Path = CHECKPOINT):
    """[n, SEQ_LEN + 1] token windows of the held-out split, as train_tiny.py builds them."""
    from models.checkpoints import train_tiny as tt

    tok, held_docs = held_out_docs(path)
    stream = [i for ids in tt.to_ids(tok, held_docs) for i in ids]
    return tt.chunks(stream, SEQ_LEN)


def held_out_docs(path: Path = CHECKPOINT):
    """(tokenizer, [(text, is_chat)]): the held-out documents in train_tiny.py's order."""
    from transformers import AutoTokenizer

    from models.checkpoints import train_tiny as tt

    tok = AutoTokenizer.from_pretrained(path)
    rng = random.Random(SEED)
    corpus = tt.build_corpus()
    held = [d for d in corpus if tt.h(d[0]) % 100 < 4]
    train = [d for d in corpus if tt.h(d[0]) % 100 >= 4]

    def fmt(docs):  # train_tiny.main's fmt: ~35% of API docstrings also as a chat exchange
        out = []
        for doc_id, name, text in docs:
            out.append((text, False))
            if doc_id.startswith(("obj:", "mod:")) and tt.h("chat" + doc_id) % 100 < 35:
                body = text.split("\n\n", 1)[-1] if doc_id.startswith("obj:") else text
                msgs = [{"role": "user", "content": tt.CHAT_PROMPTS[tt.h(doc_id) % 4].format(name)},
                        {"role": "assistant", "content": body}]
                if tt.h("sys" + doc_id) % 2:
                    msgs.insert(0, {"role": "system", "content": tt.SYSTEM_PROMPT})
                out.append((tok.apply_chat_template(msgs, tokenize=False), True))
        return out

    train_docs, held_docs = fmt(train), fmt(held)
    rng.shuffle(train_docs)  # the script shuffles the train docs first: the same generator state
    rng.shuffle(held_docs)
    return tok, held_docs


def cross_entropy(model, windows, score_from: int = 0) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats, tokens scored) over `windows`, one prefill each;
    `score_from`: score the predictions from that position on (llama-perplexity scores the
    second half of each window)."""
    import torch
    import torch.nn.functional as F

    from models.layers.paged import AttentionMetadata

    block = 16
    n_blocks = (max(len(w) for w in windows) - 1 + block - 1) // block
    caches = model.allocate_kv_cache(n_blocks, block)
    tables = torch.arange(n_blocks).view(1, n_blocks)
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            ids, target = w[:-1], w[1:]
            T = ids.numel()
            meta = AttentionMetadata(num_decodes=0, query_start_loc=[0, T], seq_lens=[T],
                                     slot_mapping=torch.arange(T), block_tables=tables,
                                     decode_seq_lens=torch.zeros(0, dtype=torch.long),
                                     state_slots=torch.zeros(1, dtype=torch.long))
            logits = model.compute_logits(model(ids, torch.arange(T), meta, caches))
            total += F.cross_entropy(logits[score_from:].float(), target[score_from:], reduction="sum").item()
            count += target[score_from:].numel()
    return total / count, count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest quant-quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="int8,int8_channel,int4,int4_zp",
                    help="comma-separated --quantization formats to compare with float32 (default: %(default)s)")
    ap.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (a quick check)")
    ap.add_argument("--model", default=str(CHECKPOINT), help="checkpoint (default: the bundled tiny-mixtral)")
    output.add_args(ap)
    args = ap.parse_args(argv)

    import torch

    from models import load_model

    windows = held_out_windows(Path(args.model))
    if args.max_windows:
        windows = windows[: args.max_windows]
    result = results.new_result("quant-quality", argv, vars(args) | {"threads": torch.get_num_threads()},
                                heading=HEADING, packages=("torch",))
    rows, base = [], None
    for fmt in ["float32", *[f for f in args.formats.split(",") if f]]:
        t0 = time.monotonic()
        model = load_model(args.model, dtype="float32", progress=False,
                           quantization=None if fmt == "float32" else fmt)
        ce, n = cross_entropy(model, windows)
        qbytes = sum(q.nbytes for q in model.quantized.values())
        base = ce if base is None else base
        ppl = math.exp(ce)
        result["measurements"][fmt] = {"ce_nats": ce, "perplexity": ppl, "tokens": n, "quantized_bytes": qbytes,
                                       "seconds": time.monotonic() - t0}
        rows.append([fmt, ce, ppl, f"{(ppl / math.exp(base) - 1) * 100:+.2f}%", qbytes / 2**20 if qbytes else "-"])
        print(f"{fmt}: CE {ce:.4f} nats/token, perplexity {ppl:.3f} over {n} tokens", flush=True)
    result["summary"]["blocks"] = [
        results.table(None, [results.column("weights"), results.column("cross-entropy (nats/token)", ".4f"),
                             results.column("perplexity", ".3f"), results.column("perplexity vs float32"),
                             results.column("quantized weights (MiB)", ".2f")], rows),
        results.text(f"{len(windows)} held-out windows of {SEQ_LEN} tokens ({rows and result['measurements']['float32']['tokens']} "
                     "tokens scored); the quantized formats cover q/k/v, o, the experts and the LM head "
                     "(embedding, norms and router stay float32)."),
    ]
    output.finish(result, args)
    return 0
