"""Train the bundled tiny Mixtral-style MoE checkpoint (``models/checkpoints/tiny-mixtral/``).

Everything is built offline from text that ships with every CPython install: the
``pydoc_data.topics`` help texts plus the docstrings of a fixed, sorted list of
standard-library modules.  A byte-level BPE tokenizer (with chat markers) is
trained on that corpus, then an 8-expert / top-2 ``MixtralForCausalLM`` is
trained from scratch on CPU (float32 compute, seeded, fixed data order), saved in
bfloat16, evaluated on a held-out split and reloaded with the ``Auto*`` classes.

Reproduce (repo root; ~9-12 minutes wall on a 2-core machine shared with other jobs)::

    python -m models.checkpoints.train_tiny            # defaults = the bundled checkpoint
    python -m models.checkpoints.train_tiny --help

The step count is fixed (``--steps``) so runs are reproducible; ``--max-minutes``
is only a safety stop for the training loop (if it fires, TRAINING.md says so).
The default is one torch thread: with other processes on the two cores, two
OpenMP threads were slower per step (docs/benchmarks.md, section "Numbers behind
code choices").  The corpus (and so the
result) depends on the Python version, and bitwise on the torch build and thread
count; TRAINING.md and training_metrics.json record them.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import platform
import random
import re
import sys
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

OUT_DIR = Path(__file__).resolve().parent / "tiny-mixtral"
COMMAND = "python -m models.checkpoints.train_tiny"
ARTIFACTS = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
STALE = [*ARTIFACTS, "chat_template.jinja", "special_tokens_map.json", "TRAINING.md", "training_metrics.json"]
SPECIAL = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Imported only for their docstrings; all are side-effect free on import.  Missing ones are skipped.
STDLIB_MODULES = sorted("""
abc argparse array ast asyncio asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.protocols
asyncio.queues asyncio.runners asyncio.streams asyncio.subprocess asyncio.taskgroups asyncio.tasks asyncio.timeouts
asyncio.transports base64 bdb binascii bisect builtins bz2 calendar cmath cmd code codecs codeop collections
collections.abc colorsys compileall concurrent.futures configparser contextlib contextvars copy copyreg csv ctypes
dataclasses datetime decimal difflib dis doctest email email.charset email.contentmanager email.encoders
email.errors email.feedparser email.generator email.header email.headerregistry email.iterators email.message
email.parser email.policy email.utils enum fcntl filecmp fileinput fnmatch fractions ftplib functools gc getopt
getpass gettext glob graphlib grp gzip hashlib heapq hmac html html.parser http http.client http.cookiejar
http.cookies http.server imaplib importlib importlib.abc importlib.machinery importlib.metadata importlib.resources
importlib.util inspect io ipaddress itertools json json.decoder json.encoder keyword linecache locale logging
logging.config logging.handlers lzma mailbox marshal math mimetypes mmap modulefinder multiprocessing
multiprocessing.connection multiprocessing.context multiprocessing.managers multiprocessing.pool
multiprocessing.process multiprocessing.queues multiprocessing.shared_memory multiprocessing.synchronize netrc
numbers opcode operator optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint profile
pstats pty pwd py_compile pyclbr queue quopri random re reprlib resource runpy sched secrets select selectors shelve
shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess symtable sys
sysconfig syslog tabnanny tarfile tempfile termios textwrap threading time timeit token tokenize tomllib trace
traceback tracemalloc tty types typing unicodedata unittest unittest.case unittest.loader unittest.mock
unittest.result unittest.runner unittest.suite urllib.error urllib.parse urllib.request urllib.robotparser uuid
warnings wave weakref wsgiref.simple_server xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree xml.sax
xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client xmlrpc.server zipapp zipfile zipimport zlib
zoneinfo
""".split())  # noqa: SIM905 - a word list reads better than 222 quoted strings
CHAT_PROMPTS = ["Explain {}.", "What does {} do?", "Describe {} in Python.", "How do I use {}?"]
SYSTEM_PROMPT = "You are a helpful assistant that answers questions about Python."
PROMPTS = ["The list data type", "def ", "Return a new"]
CHAT_PROBE = [{"role": "user", "content": "Explain json.dumps."}]


def _doc(obj) -> str | None:
    d = getattr(obj, "__doc__", None)
    return inspect.cleandoc(d) if isinstance(d, str) and len(d.strip()) >= 40 else None


def _sig(obj) -> str:
    try:  # sentinel defaults print as "<object object at 0x7f...>": drop the per-process address
        return re.sub(r" at 0x[0-9a-fA-F]+", "", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return ""


def build_corpus() -> list[tuple[str, str, str]]:
    """Deterministic, de-duplicated list of (doc_id, name, text) documents."""
    from pydoc_data.topics import topics

    docs = [(f"topic:{k}", k, topics[k].strip()) for k in sorted(topics)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in STDLIB_MODULES:
            try:
                mod = importlib.import_module(modname)
            except Exception:  # noqa: BLE001, S112 - optional C extensions may be missing
                continue
            if d := _doc(mod):
                docs.append((f"mod:{modname}", modname, d))
            for name in sorted(vars(mod)):
                obj = vars(mod)[name]
                if name.startswith("_") or getattr(obj, "__module__", None) != modname or not (
                        inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue  # re-exports are documented where they are defined
                qual = f"{modname}.{name}"
                if d := _doc(obj):
                    docs.append((f"obj:{qual}", qual, f"{qual}{_sig(obj)}\n\n{d}"))
                if inspect.isclass(obj):
                    for mname in sorted(vars(obj)):
                        meth = vars(obj)[mname]
                        if mname.startswith("_") and mname != "__init__":
                            continue
                        meth = getattr(meth, "__func__", meth)
                        if inspect.isroutine(meth) and (d := _doc(meth)):
                            mq = f"{qual}.{mname}"
                            docs.append((f"obj:{mq}", mq, f"{mq}{_sig(meth)}\n\n{d}"))
    seen, out = set(), []
    for doc_id, name, text in docs:
        if text not in seen:
            seen.add(text)
            out.append((doc_id, name, text))
    return out


def h(s: str) -> int:
    return zlib.crc32(s.encode())


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens=SPECIAL[3:], clean_up_tokenization_spaces=False, model_max_length=2048)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def patch_json(path: Path, drop=(), **updates) -> None:
    d = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    path.write_text(json.dumps({**d, **updates}, indent=2, ensure_ascii=False) + "\n")


def format_docs(tok, docs) -> list[tuple[str, bool]]:
    """(text, is_chat) per doc: ~35% of API docstrings additionally appear as a chat exchange
    (deterministic)."""
    out = []
    for doc_id, name, text in docs:
        out.append((text, False))
        if doc_id.startswith(("obj:", "mod:")) and h("chat" + doc_id) % 100 < 35:
            body = text.split("\n\n", 1)[-1] if doc_id.startswith("obj:") else text
            msgs = [{"role": "user", "content": CHAT_PROMPTS[h(doc_id) % 4].format(name)},
                    {"role": "assistant", "content": body}]
            if h("sys" + doc_id) % 2:
                msgs.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
            out.append((tok.apply_chat_template(msgs, tokenize=False), True))
    return out


def to_ids(tok, docs) -> list[list[int]]:
    """Plain docs -> <s> text </s>; chat docs (rendered with the template, which adds <s>) -> ... </s>."""
    texts = [t if chat else tok.bos_token + t for t, chat in docs]
    enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [e.ids + [tok.eos_token_id] for e in enc]


def chunks(ids: list[int], seq: int) -> torch.Tensor:
    n = (len(ids) - 1) // seq
    t = torch.tensor(ids[: n * seq + 1])
    return torch.stack([t[i * seq: i * seq + seq + 1] for i in range(n)])


@torch.no_grad()
def evaluate(model, data: torch.Tensor, bs: int, n_exp: int, top_k: int):
    model.eval()
    nll, ntok, counts = 0.0, 0, torch.zeros(n_exp)
    for i in range(0, len(data), bs):
        x = data[i: i + bs]
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        nll += F.cross_entropy(out.logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum").item()
        ntok += x[:, 1:].numel()
        for rl in out.router_logits:
            counts += torch.bincount(rl.topk(top_k, dim=-1).indices.flatten(), minlength=n_exp).float()
    return nll / ntok, (counts / counts.sum()).tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=20, help="linear warmup steps (default: %(default)s)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE vocab incl. specials (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s; on a shared"
                    " 2-core box 2 threads were slower than 1: docs/benchmarks.md)")
    ap.add_argument("--max-minutes", type=float, default=12.5,
                    help="safety stop for the training loop only; stops early (recorded) if exceeded")
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, MixtralConfig, MixtralForCausalLM

    # ---- corpus, split, tokenizer -------------------------------------------------------------
    corpus = build_corpus()
    held = [d for d in corpus if h(d[0]) % 100 < 4]
    train = [d for d in corpus if h(d[0]) % 100 >= 4]
    print(f"corpus: {len(corpus)} docs ({sum(len(d[2]) for d in corpus)} chars); "
          f"train {len(train)}, held-out {len(held)}", flush=True)
    tok = train_tokenizer([d[2] for d in train], args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in STALE:  # never mix files from an older run into the new checkpoint
        (args.out / name).unlink(missing_ok=True)
    tok.save_pretrained(args.out, save_jinja_files=False)
    # Also loadable by transformers 4.x (vLLM envs): generic class name, list-style extra specials.
    patch_json(args.out / "tokenizer_config.json", drop=("backend", "extra_special_tokens"),
               tokenizer_class="PreTrainedTokenizerFast", additional_special_tokens=SPECIAL[3:])

    train_docs, held_docs = format_docs(tok, train), format_docs(tok, held)
    rng.shuffle(train_docs)
    rng.shuffle(held_docs)  # a doc and its chat copy must not sit side by side in an eval window
    train_stream = [i for ids in to_ids(tok, train_docs) for i in ids]
    held_stream = [i for ids in to_ids(tok, held_docs) for i in ids]
    train_data, held_data = chunks(train_stream, args.seq_len), chunks(held_stream, args.seq_len)
    print(f"tokens: train {len(train_stream)}, held-out {len(held_stream)}; "
          f"{args.steps * args.batch_size * args.seq_len / len(train_stream):.2f} epochs", flush=True)

    # ---- model ---------------------------------------------------------------------------------
    cfg = MixtralConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=2048, rope_theta=10000.0, sliding_window=None,
        tie_word_embeddings=False, router_aux_loss_coef=0.02, output_router_logits=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=0.02, rms_norm_eps=1e-5)
    model = MixtralForCausalLM(cfg).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    params = list(model.parameters())  # weight decay on matrices only, not on norm gains
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / args.warmup if s < args.warmup else
                                              0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - args.warmup)
                                                                   / max(1, args.steps - args.warmup))))
    g = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(train_data), generator=g), 0
    model.train()
    t0, stopped_early, step, losses = time.time(), False, 0, []
    bar = tqdm(range(args.steps), desc="train", mininterval=5.0, file=sys.stdout)
    for step in bar:  # noqa: B007 - read after the loop (steps_done)
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(train_data), generator=g), 0
        x = train_data[order[pos: pos + args.batch_size]]
        pos += args.batch_size
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        lm_loss = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        (lm_loss + cfg.router_aux_loss_coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(lm_loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", aux=f"{out.aux_loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if time.time() - t0 > args.max_minutes * 60:
            stopped_early = True
            break
    bar.close()
    steps_done = step + 1
    train_wall = time.time() - t0

    # ---- evaluation ----------------------------------------------------------------------------
    held_loss, shares = evaluate(model, held_data, 16, cfg.num_local_experts, cfg.num_experts_per_tok)
    freq = torch.bincount(torch.tensor(train_stream), minlength=len(tok)).double() + 1.0
    logp = (freq / freq.sum()).log()
    unigram = -logp[held_data[:, 1:].flatten()].mean().item()
    print(f"held-out CE {held_loss:.4f} nats/token vs unigram {unigram:.4f} ({held_loss / unigram:.1%})", flush=True)

    # ---- save (bf16) and reload ----------------------------------------------------------------
    eos_ids = [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos_ids,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    patch_json(args.out / "config.json", rope_theta=cfg.rope_parameters["rope_theta"])  # 4.x-style key too
    from safetensors import safe_open
    with safe_open(str(args.out / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    hub = [f"model.layers.{n}.block_sparse_moe.{k}.weight" for n in range(cfg.num_hidden_layers) for k in
           ["gate", *(f"experts.{e}.w{i}" for e in range(cfg.num_local_experts) for i in (1, 2, 3))]]
    assert set(hub) <= set(keys) and not any("gate_up_proj" in k for k in keys), f"non-hub layout: {keys[:9]}"

    model2 = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(args.out)
    probe = "The list data type, def f(x):\n    return x  # ünïcode ✓"
    assert tok2.decode(tok2(probe, add_special_tokens=False)["input_ids"]) == probe, "tokenizer round-trip failed"
    assert tok2("x")["input_ids"][0] == tok.bos_token_id and tok2.chat_template == CHAT_TEMPLATE
    assert model2.config.rope_parameters["rope_theta"] == 10000.0 and model2.config.head_dim == 64
    samples = {}
    for p in PROMPTS:
        ids = tok2(p, return_tensors="pt")["input_ids"]
        gen = model2.generate(ids, max_new_tokens=40, do_sample=False)
        samples[p] = tok2.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    chat_ids = tok2.apply_chat_template(CHAT_PROBE, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    assert chat_ids[0, 0] == tok.bos_token_id != chat_ids[0, 1], "chat prompt must start with exactly one <s>"
    gen = model2.generate(chat_ids, max_new_tokens=60, do_sample=False)
    chat_reply = tok2.decode(gen[0, chat_ids.shape[1]:], skip_special_tokens=False)
    reload_loss, _ = evaluate(model2, held_data, 16, cfg.num_local_experts, cfg.num_experts_per_tok)
    print(json.dumps({**samples, "chat": chat_reply}, indent=1, ensure_ascii=False), flush=True)

    # ---- report --------------------------------------------------------------------------------
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.name in ARTIFACTS}
    special_ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    m = {
        "command": " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])]), "seed": args.seed,
        "threads": args.threads, "steps": steps_done, "steps_requested": args.steps, "stopped_early": stopped_early,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "peak_lr": args.lr, "warmup": args.warmup,
        "train_wall_s": round(train_wall, 1), "total_wall_s": round(time.time() - t_start, 1),
        "parameters": n_params, "docs_train": len(train), "docs_heldout": len(held),
        "tokens_train": len(train_stream), "tokens_heldout_scored": held_data[:, 1:].numel(),
        "train_loss_last20": sum(losses[-20:]) / len(losses[-20:]),
        "heldout_ce_nats": held_loss, "heldout_ce_nats_bf16_reloaded": reload_loss, "unigram_ce_nats": unigram,
        "ratio_to_unigram": held_loss / unigram, "expert_share_heldout": shares, "samples": samples,
        "chat_sample": {"messages": CHAT_PROBE, "reply": chat_reply}, "special_token_ids": special_ids,
        "generation_eos_token_ids": eos_ids, "file_bytes": sizes, "checkpoint_bytes": sum(sizes.values()),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    (args.out / "training_metrics.json").write_text(json.dumps(m, indent=2, ensure_ascii=False) + "\n")
    md = [
        "# tiny-mixtral", "",
        "A tiny Mixtral-architecture MoE language model for moe-serve tests and demos, trained from scratch on CPU",
        "on Python's own documentation (`pydoc_data.topics` + standard-library docstrings), so it only produces",
        "Python-documentation-flavoured text. Written by `models/checkpoints/train_tiny.py`, like every number here.",
        "", "## Reproduce", "", "```", m["command"], "```", "",
        (f"Seed {m['seed']}; {m['steps']} steps (requested {m['steps_requested']}, stopped early: {stopped_early})"
        f" of {m['batch_size']} x {m['seq_len']} tokens; AdamW peak lr {m['peak_lr']}, {m['warmup']} warmup"
        f" steps, cosine decay; router aux loss coef {cfg.router_aux_loss_coef}. Training loop {m['train_wall_s']} s"
        f" wall, whole script {m['total_wall_s']} s; torch threads {args.threads}. Python {m['python']},"
        f" torch {m['torch']}, transformers {m['transformers']}."), "",
        "## Model", "",
        (f"`MixtralForCausalLM`: vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers,"
        f" {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, head_dim {cfg.head_dim},"
        f" {cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, expert intermediate"
        f" {cfg.intermediate_size}, max positions {cfg.max_position_embeddings}, rope theta"
        f" {cfg.rope_parameters['rope_theta']}, untied embeddings; {n_params:,} parameters, stored in bfloat16."), "",
        (f"Special token ids: {special_ids}. `config.json` eos = `</s>` ({tok.eos_token_id});"
        f" `generation_config.json` eos = {eos_ids} (`</s>`, `<|end|>`). The tokenizer prepends `<s>` when"
        " called with `add_special_tokens=True`; the chat template starts with `<s>` itself, so tokenize a"
        " rendered chat prompt with `add_special_tokens=False`."), "",
        "## Evaluation (held-out split, ~4% of documents)", "",
        (f"- corpus: {m['docs_train']} train / {m['docs_heldout']} held-out documents;"
        f" {m['tokens_train']} train tokens, {m['tokens_heldout_scored']} held-out tokens scored"),
        (f"- held-out cross-entropy: **{held_loss:.4f} nats/token** (fp32 weights before saving);"
        f" {reload_loss:.4f} after bf16 save + reload"),
        (f"- unigram baseline (train-split frequencies, add-one): **{unigram:.4f} nats/token**;"
        f" ratio {held_loss / unigram:.1%}"),
        f"- final train loss (mean of last 20 steps): {m['train_loss_last20']:.4f}",
        "- expert routing share on held-out (all layers, top-2): "
        + ", ".join(f"e{i} {s:.1%}" for i, s in enumerate(shares)), "",
        "## Greedy samples (bf16 checkpoint reloaded)", "",
        *[f"- `{p!r}` -> `{s!r}`" for p, s in samples.items()], f"- chat `{CHAT_PROBE!r}` -> `{chat_reply!r}`",
        "", "## Files", "", *[f"- `{n}`: {b:,} bytes" for n, b in sizes.items()],
        (f"- total (model + config + tokenizer): {m['checkpoint_bytes']:,} bytes; plus this file and"
        " `training_metrics.json`"), "",
    ]
    (args.out / "TRAINING.md").write_text("\n".join(md))
    if held_loss > 0.6 * unigram:
        print("WARNING: held-out loss is not below 60% of the unigram baseline", flush=True)
    print(f"done in {time.time() - t_start:.0f} s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
