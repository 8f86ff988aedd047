"""Train the bundled tiny DeepSeek-V3 checkpoint with one multi-token-prediction (MTP) layer
(``models/checkpoints/tiny-deepseek-mtp/``), for real speculative decoding on CPU.

The corpus, split and tokenizer are those of ``tiny-mixtral`` (``train_tiny.py``; the tokenizer
files are copied from ``tiny-mixtral/``, not retrained). The model is a ``DeepseekV3ForCausalLM``
(MLA with a q LoRA, a dense first layer, then MoE layers with one shared expert and sigmoid,
group-limited routing with the auxiliary-loss-free correction bias) plus ONE MTP layer in the
published DeepSeek-V3 layout, at index ``num_hidden_layers`` (``num_nextn_predict_layers: 1``):

    h'  = eh_proj(concat(enorm(embed(x[t+1])), hnorm(h[t])))     # h: the main model's final hidden
    out = decoder_layer(h')                                      # a full DeepSeek-V3 (MoE) layer
    logits(x[t+2]) = shared_head.head(shared_head.norm(out))

The embedding and the LM head are shared with the main model (so the checkpoint stores no
``model.layers.N.embed_tokens`` / ``shared_head.head`` copies; loaders share the main model's).
As in vLLM, the token embedding is zeroed at position 0. Loss = main LM loss + 0.3 * MTP loss.

Reproduce (repo root; ~10 minutes wall on a 2-core machine shared with other jobs)::

    python -m models.checkpoints.train_tiny_mtp

TRAINING.md and training_metrics.json (written by this script) hold every number: held-out loss
of both heads and the MTP head's teacher-forced acceptance rate (the fraction of held-out positions
where the MTP argmax equals the main model's own greedy next-next token).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.checkpoints.train_tiny import OUT_DIR as MIXTRAL_DIR
from models.checkpoints.train_tiny import PROMPTS, build_corpus, chunks, format_docs, h, patch_json, to_ids

OUT_DIR = Path(__file__).resolve().parent / "tiny-deepseek-mtp"
COMMAND = "python -m models.checkpoints.train_tiny_mtp"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
ARTIFACTS = ["config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES]
STALE = [*ARTIFACTS, "TRAINING.md", "training_metrics.json"]
MTP_WEIGHT = 0.3
BIAS_UPDATE = 1e-3  # auxiliary-loss-free balancing: correction bias step per optimizer step


class MTPLayer(nn.Module):
    """The training-side MTP layer (DeepSeek-V3 names; embedding and head are the main model's)."""

    def __init__(self, cfg, layer_idx: int):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

        super().__init__()
        self.enorm = DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DeepseekV3DecoderLayer(cfg, layer_idx)
        self.shared_head_norm = DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, model, next_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """next_ids [B, S] (token t+1), hidden [B, S, H] (main final hidden at t), positions 0..S-1 ->
        logits [B, S, V] for token t+2."""
        emb = model.model.embed_tokens(next_ids)
        emb = torch.cat([torch.zeros_like(emb[:, :1]), emb[:, 1:]], dim=1)  # position 0 masked (vLLM)
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        pos = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)
        cos_sin = model.model.rotary_emb(x, pos)
        x = self.block(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        return model.lm_head(self.shared_head_norm(x))

    def checkpoint_tensors(self, layer_idx: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{layer_idx}"
        out = {f"{p}.enorm.weight": self.enorm.weight, f"{p}.hnorm.weight": self.hnorm.weight,
               f"{p}.eh_proj.weight": self.eh_proj.weight,
               f"{p}.shared_head.norm.weight": self.shared_head_norm.weight}
        for name, t in self.block.state_dict().items():
            if name == "mlp.experts.gate_up_proj":  # transformers' fused experts -> the published per-expert names
                inter = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = t[e, :inter]
                    out[f"{p}.mlp.experts.{e}.up_proj.weight"] = t[e, inter:]
            elif name == "mlp.experts.down_proj":
                for e in range(t.shape[0]):
                    out[f"{p}.mlp.experts.{e}.down_proj.weight"] = t[e]
            else:
                out[f"{p}.{name}"] = t
        return out


def run(model, mtp, x: torch.Tensor):
    """One pass: (main logits [B, S, V], MTP logits [B, S-1, V]) for x [B, S+1]."""
    inp = x[:, :-1]
    hidden = model.model(input_ids=inp).last_hidden_state  # after the final norm, as served
    logits = model.lm_head(hidden)
    mtp_logits = mtp(model, inp[:, 1:], hidden[:, :-1])  # position t: embed(x[t+1]), h[t] -> x[t+2]
    return logits, mtp_logits


@torch.no_grad()
def evaluate(model, mtp, data: torch.Tensor, bs: int):
    model.eval()
    mtp.eval()
    nll = mtp_nll = 0.0
    n = n_mtp = accepted = 0
    for i in range(0, len(data), bs):
        x = data[i: i + bs]
        logits, mtp_logits = run(model, mtp, x)
        nll += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        n += x[:, 1:].numel()
        mtp_nll += F.cross_entropy(mtp_logits.flatten(0, 1), x[:, 2:].flatten(), reduction="sum").item()
        n_mtp += x[:, 2:].numel()
        accepted += (mtp_logits.argmax(-1) == logits[:, 1:].argmax(-1)).sum().item()
    return nll / n, mtp_nll / n_mtp, accepted / n_mtp


@torch.no_grad()
def greedy_acceptance(model, mtp, tok, prompts: list[str], new: int) -> tuple[float, dict[str, str]]:
    """Generate greedily with the main model, then the share of generated positions where MTP (fed the
    main model's hidden state and the token just generated) drafts the next generated token."""
    hits = total = 0
    samples = {}
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=new, do_sample=False)
        samples[p] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        x = gen[:, :]
        _, mtp_logits = run(model, mtp, x)  # position t drafts x[t+2]
        start = ids.shape[1] - 1  # drafts made once the prompt is in: the token at start+1 is generated
        hits += (mtp_logits[0, start:].argmax(-1) == x[0, start + 2:]).sum().item()
        total += x.shape[1] - start - 2
    return hits / max(total, 1), samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=20, help="linear warmup steps (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--max-minutes", type=float, default=11.5,
                    help="safety stop for the training loop only; stops early (recorded) if exceeded")
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    from transformers import AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig

    # ---- corpus and split as tiny-mixtral; its tokenizer ------------------------------------------
    corpus = build_corpus()
    held = [d for d in corpus if h(d[0]) % 100 < 4]
    train = [d for d in corpus if h(d[0]) % 100 >= 4]
    tok = AutoTokenizer.from_pretrained(MIXTRAL_DIR)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in STALE:
        (args.out / name).unlink(missing_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(MIXTRAL_DIR / name, args.out / name)
    train_docs, held_docs = format_docs(tok, train), format_docs(tok, held)
    rng.shuffle(train_docs)
    rng.shuffle(held_docs)
    train_stream = [i for ids in to_ids(tok, train_docs) for i in ids]
    held_stream = [i for ids in to_ids(tok, held_docs) for i in ids]
    train_data, held_data = chunks(train_stream, args.seq_len), chunks(held_stream, args.seq_len)
    print(f"tokens: train {len(train_stream)}, held-out {len(held_stream)}; "
          f"{args.steps * args.batch_size * args.seq_len / len(train_stream):.2f} epochs", flush=True)

    # ---- model ---------------------------------------------------------------------------------
    cfg = DeepseekV3Config(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=1,
        max_position_embeddings=2048, rope_theta=10000.0, rope_interleave=True, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=0.02, rms_norm_eps=1e-6, attn_implementation="sdpa")  # type: ignore[call-arg]
    model = DeepseekV3ForCausalLM(cfg).float()
    L = cfg.num_hidden_layers
    mtp = MTPLayer(cfg, L).float()
    mtp.apply(model._init_weights)
    routers = [m for m in [*model.modules(), *mtp.modules()] if type(m).__name__ == "DeepseekV3TopkRouter"]
    loads: dict[int, torch.Tensor] = {}

    def count(mod, inp, out):  # expert loads of this step, for the correction-bias update
        loads[id(mod)] = loads.get(id(mod), 0) + torch.bincount(out[2].flatten(), minlength=cfg.n_routed_experts)

    for r in routers:
        r.register_forward_hook(count)
    n_main = sum(p.numel() for p in model.parameters())
    n_mtp = sum(p.numel() for p in mtp.parameters())
    print(f"model: {n_main / 1e6:.2f}M parameters + MTP layer {n_mtp / 1e6:.2f}M", flush=True)

    params = list(model.parameters()) + list(mtp.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / args.warmup if s < args.warmup else
                                              0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - args.warmup)
                                                                   / max(1, args.steps - args.warmup))))
    g = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(train_data), generator=g), 0
    model.train()
    mtp.train()
    t0, stopped_early, step, losses, mtp_losses = time.time(), False, 0, [], []
    bar = tqdm(range(args.steps), desc="train", mininterval=5.0, file=sys.stdout)
    for step in bar:  # noqa: B007 - read after the loop (steps_done)
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(train_data), generator=g), 0
        x = train_data[order[pos: pos + args.batch_size]]
        pos += args.batch_size
        loads.clear()
        logits, mtp_logits = run(model, mtp, x)
        lm_loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        mtp_loss = F.cross_entropy(mtp_logits.flatten(0, 1), x[:, 2:].flatten())
        opt.zero_grad(set_to_none=True)
        (lm_loss + MTP_WEIGHT * mtp_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # DeepSeek-V3's auxiliary-loss-free balancing
            for r in routers:
                load = loads[id(r)].float()
                r.e_score_correction_bias += BIAS_UPDATE * torch.sign(load.mean() - load)
        losses.append(lm_loss.item())
        mtp_losses.append(mtp_loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", mtp=f"{mtp_losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if time.time() - t0 > args.max_minutes * 60:
            stopped_early = True
            break
    bar.close()
    steps_done = step + 1
    train_wall = time.time() - t0

    # ---- evaluation ----------------------------------------------------------------------------
    held_loss, mtp_held_loss, accept = evaluate(model, mtp, held_data, 16)
    print(f"held-out CE {held_loss:.4f}, MTP (t+2) CE {mtp_held_loss:.4f}, teacher-forced acceptance "
          f"{accept:.1%}", flush=True)

    # ---- save (bf16): the main model, then the MTP layer's tensors appended ----------------------
    eos_ids = [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos_ids,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    mtp.to(torch.bfloat16)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(args.out / "model.safetensors"))
    extra = mtp.checkpoint_tensors(L)
    assert not set(extra) & set(tensors)
    tensors.update({k: v.detach().contiguous() for k, v in extra.items()})
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    patch_json(args.out / "config.json", rope_theta=10000.0)

    # ---- reload: the main model with transformers, the MTP layer from the saved tensors ----------
    model2 = DeepseekV3ForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    mtp2 = MTPLayer(model2.config, L).float().eval()
    saved = load_file(str(args.out / "model.safetensors"))
    mine = {k: saved[k].float() for k in extra}
    own = mtp2.checkpoint_tensors(L)  # views of mtp2's tensors
    assert set(own) == set(mine)
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(mine[k])
    reload_loss, reload_mtp_loss, reload_accept = evaluate(model2, mtp2, held_data, 16)
    tok2 = AutoTokenizer.from_pretrained(args.out)
    greedy_accept, samples = greedy_acceptance(model2, mtp2, tok2, PROMPTS, 48)
    print(json.dumps(samples, indent=1, ensure_ascii=False), flush=True)
    print(f"bf16 reloaded: held-out CE {reload_loss:.4f}, MTP CE {reload_mtp_loss:.4f}, acceptance "
          f"{reload_accept:.1%}; on greedy continuations {greedy_accept:.1%}", flush=True)
    freq = torch.bincount(torch.tensor(train_stream), minlength=len(tok)).double() + 1.0
    unigram = -(freq / freq.sum()).log()[held_data[:, 1:].flatten()].mean().item()

    # ---- report --------------------------------------------------------------------------------
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.name in ARTIFACTS}
    m = {
        "command": " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])]), "seed": args.seed,
        "threads": args.threads, "steps": steps_done, "steps_requested": args.steps, "stopped_early": stopped_early,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "peak_lr": args.lr, "warmup": args.warmup,
        "mtp_loss_weight": MTP_WEIGHT, "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.time() - t_start, 1), "parameters_main": n_main, "parameters_mtp": n_mtp,
        "tokens_train": len(train_stream), "tokens_heldout_scored": held_data[:, 1:].numel(),
        "train_loss_last20": sum(losses[-20:]) / len(losses[-20:]),
        "train_mtp_loss_last20": sum(mtp_losses[-20:]) / len(mtp_losses[-20:]),
        "heldout_ce_nats": held_loss, "heldout_mtp_ce_nats": mtp_held_loss, "heldout_mtp_acceptance": accept,
        "heldout_ce_nats_bf16_reloaded": reload_loss, "heldout_mtp_ce_nats_bf16_reloaded": reload_mtp_loss,
        "heldout_mtp_acceptance_bf16_reloaded": reload_accept, "greedy_mtp_acceptance_bf16": greedy_accept,
        "unigram_ce_nats": unigram, "samples": samples, "file_bytes": sizes,
        "checkpoint_bytes": sum(sizes.values()), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    (args.out / "training_metrics.json").write_text(json.dumps(m, indent=2, ensure_ascii=False) + "\n")
    md = [
        "# tiny-deepseek-mtp", "",
        "A tiny DeepSeek-V3-architecture MoE model with one multi-token-prediction (MTP) layer, for moe-serve's",
        "speculative decoding tests and benchmarks. Same corpus, split and tokenizer as `tiny-mixtral`. Written",
        "by `models/checkpoints/train_tiny_mtp.py`, like every number here.", "",
        "## Reproduce", "", "```", m["command"], "```", "",
        (f"Seed {m['seed']}; {m['steps']} steps (requested {m['steps_requested']}, stopped early: {stopped_early})"
         f" of {m['batch_size']} x {m['seq_len']} tokens; AdamW peak lr {m['peak_lr']}, {m['warmup']} warmup"
         f" steps, cosine decay; loss = LM loss + {MTP_WEIGHT} x MTP loss (token t+2); expert balance by the"
         f" auxiliary-loss-free correction bias (step {BIAS_UPDATE}). Training loop {m['train_wall_s']} s wall,"
         f" whole script {m['total_wall_s']} s; torch threads {args.threads}. Python {m['python']}, torch"
         f" {m['torch']}, transformers {m['transformers']}."), "",
        "## Model", "",
        (f"`DeepseekV3ForCausalLM`: vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, {L} layers (first"
         f" {cfg.first_k_dense_replace} dense, intermediate {cfg.intermediate_size}), MLA ({cfg.num_attention_heads}"
         f" heads, q_lora_rank {cfg.q_lora_rank}, kv_lora_rank {cfg.kv_lora_rank}, qk nope/rope"
         f" {cfg.qk_nope_head_dim}/{cfg.qk_rope_head_dim}, v {cfg.v_head_dim}), {cfg.n_routed_experts} routed"
         f" experts top-{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared (intermediate"
         f" {cfg.moe_intermediate_size}), sigmoid routing with {cfg.n_group} groups / top-{cfg.topk_group} groups,"
         f" routed scaling {cfg.routed_scaling_factor}; {n_main:,} parameters. MTP layer"
         f" `model.layers.{L}.*` (`num_nextn_predict_layers: 1`): enorm, hnorm, eh_proj, one MoE decoder"
         f" layer, shared_head.norm; embedding and head shared with the main model; {n_mtp:,} parameters."
         " Stored in bfloat16."), "",
        "## Evaluation (held-out split, ~4% of documents)", "",
        (f"- held-out cross-entropy, main head: **{held_loss:.4f} nats/token** (fp32); {reload_loss:.4f} after"
         f" bf16 save + reload; unigram baseline {unigram:.4f}"),
        (f"- held-out cross-entropy, MTP head (token t+2): **{mtp_held_loss:.4f} nats/token** (fp32);"
         f" {reload_mtp_loss:.4f} bf16 reloaded"),
        (f"- MTP teacher-forced acceptance (MTP argmax == the main model's greedy next-next token, held-out"
         f" positions): **{accept:.1%}** (fp32); {reload_accept:.1%} bf16 reloaded"),
        (f"- MTP acceptance along the main model's own greedy continuations of the prompts below (48 tokens"
         f" each, bf16): {greedy_accept:.1%}"),
        (f"- final train loss (mean of last 20 steps): LM {m['train_loss_last20']:.4f}, MTP"
         f" {m['train_mtp_loss_last20']:.4f}"), "",
        "## Greedy samples (bf16 checkpoint reloaded)", "",
        *[f"- `{p!r}` -> `{s!r}`" for p, s in samples.items()], "",
        "## Files", "", *[f"- `{n}`: {b:,} bytes" for n, b in sizes.items()],
        f"- total: {m['checkpoint_bytes']:,} bytes; plus this file and `training_metrics.json`", "",
    ]
    (args.out / "TRAINING.md").write_text("\n".join(md))
    print(f"done in {time.time() - t_start:.0f} s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
