"""Fixtures of the agent-API tests: a tiny random-weight MoE with the bundled tokenizer and a long
context. Coding agents (Claude Code, Codex CLI) send system prompts and tool definitions of tens
of thousands of tokens, which the bundled checkpoint's 2,048 positions cannot hold; the weights
are random (the agents' answers are noise), what the tests check is the protocol."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import BUNDLED

LONG_CONTEXT = 65536
# A ChatML-like template that renders everything the agent APIs send: tools, assistant tool calls
# (hermes' <tool_call> format) and reasoning, tool results.
AGENT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|user|>\n<tool_response id=\"{{ m['tool_call_id'] }}\">"
    "{{ m['content'] }}</tool_response><|end|>\n"
    "{% else %}<|{{ m['role'] }}|>\n"
    "{% if m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}</tool_call>"
    "{% endfor %}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think></think>{% endif %}{% endif %}")


END_DIM = 0  # the hidden dimension that carries the bias


def _end_soon(model, tokens: list[int]) -> None:
    """Agents treat an answer cut at max_tokens as an error, and a random model almost never
    ends by itself (EOS is 1 of 4096 tokens). A constant, dominant hidden dimension gives every
    position the same leading logits: `tokens` at 8 and EOS at 7.5, the rest near 0. Sampled at
    temperature 1 an answer ends after ~10 tokens (P(EOS) ~ 0.1 a step); greedy (temperature 0)
    it never ends by itself and writes `tokens`, max_tokens ends it."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, END_DIM] = 50.0
        head = model.lm_head.weight
        head[:, END_DIM] = 0.0
        scale = model.config.hidden_size ** 0.5  # the normalized dimension's value
        head[tokens, END_DIM] = 8.0 / scale
        head[model.config.eos_token_id, END_DIM] = 7.5 / scale


@pytest.fixture(scope="session")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Mixtral (2 layers, hidden 64, 4 experts top-2) with 64k positions, answers
    that end soon (_end_soon) and the bundled tokenizer (vocabulary 4096) under AGENT_CHAT_TEMPLATE;
    returns its directory."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("long-context-moe")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=LONG_CONTEXT,
        initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = transformers.MixtralForCausalLM(cfg).eval()
    _end_soon(model, tokens=[271, 266, 309, 20])  # " the", " a", " of", "." in the bundled vocabulary
    model.save_pretrained(str(path))
    shutil.copy(BUNDLED / "tokenizer.json", path / "tokenizer.json")
    tok_cfg = json.loads((BUNDLED / "tokenizer_config.json").read_text())
    tok_cfg.update(chat_template=AGENT_CHAT_TEMPLATE, model_max_length=LONG_CONTEXT)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    return path
