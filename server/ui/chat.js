// The chat / completion panel: builds the request, streams the answer into the transcript and
// the routing view, and stops it (closing the connection aborts the request on the server).

import { postJSON, stream, tokenText } from "./api.js";

const RENDER_MS = 80;

function number(input) {
  const v = input.value.trim();
  if (v === "") return undefined;
  const n = Number(v);
  return Number.isFinite(n) ? n : undefined;
}

function message(role, label) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = label;
  const body = document.createElement("div");
  body.className = "text";
  div.append(who, body);
  return { div, body };
}

export class Chat {
  constructor(els, routing, hooks) {
    this.els = els;
    this.routing = routing;
    this.hooks = hooks; // {facts(), showPrompt(), onError(err), onFinished()}
    this.mode = "chat";
    this.history = [];
    this.controller = null;
    this.lastText = "";
    this.noRouting = null; // why routing is left out of the request being retried, else null
  }

  setMode(mode) {
    if (mode === this.mode) return;
    this.clear();
    this.mode = mode;
    const chat = mode === "chat";
    this.els.systemRow.hidden = !chat;
    this.els.promptLabel.textContent = chat ? "Message" : "Prompt (raw text, no chat template)";
    this.els.prompt.placeholder = chat ? "Ask something…" : "Once upon a time";
  }

  sampling() {
    const { els } = this;
    const out = { max_tokens: number(els.maxTokens), temperature: number(els.temperature),
      top_p: number(els.topP), seed: number(els.seed) };
    for (const k of Object.keys(out)) if (out[k] === undefined) delete out[k];
    return out;
  }

  buildRequest(text) {
    const facts = this.hooks.facts();
    const base = { stream: true, stream_options: { include_usage: true }, ...this.sampling() };
    if (facts && facts.id) base.model = facts.id;
    if (this.mode === "chat") {
      const system = this.els.system.value.trim();
      const messages = [...(system ? [{ role: "system", content: system }] : []), ...this.history,
        { role: "user", content: text }];
      const body = { ...base, messages, logprobs: true, top_logprobs: 0 };
      if (!this.noRouting) body.return_routing = true;
      return { path: "/v1/chat/completions", body, tokenize: { messages, return_token_strs: true } };
    }
    const body = { ...base, prompt: text, logprobs: 0 };
    if (!this.noRouting) body.return_routing = true;
    return { path: "/v1/completions", body, tokenize: { prompt: text, return_token_strs: true } };
  }

  async send() {
    const { els } = this;
    const text = els.prompt.value;
    if (this.controller) return;
    if (!text.trim()) {
      els.status.textContent = "Type a message first.";
      els.prompt.focus();
      return;
    }
    const req = this.buildRequest(text);
    const facts = this.hooks.facts() || {};
    if (!this.noRouting) this.routing.reset(facts.num_moe_layers || 0, "Generating…");
    else this.routing.reset(0, `No routing for this response: ${this.noRouting}`);
    els.output.querySelector(".empty")?.remove();
    let target;
    if (this.mode === "chat") {
      const user = message("user", "You");
      user.body.textContent = text;
      els.output.appendChild(user.div);
      target = message("assistant", "Model");
      els.prompt.value = "";
    } else {
      target = message("completion", "Completion");
      const prompt = document.createElement("span");
      prompt.className = "prompt-text";
      prompt.textContent = text;
      target.body.appendChild(prompt);
    }
    const generated = document.createElement("span");
    target.body.appendChild(generated);
    els.output.appendChild(target.div);
    target.div.setAttribute("aria-busy", "true");

    const controller = (this.controller = new AbortController());
    this.setRunning(true);
    const showPrompt = this.hooks.showPrompt() && !this.noRouting;
    const promptLabels = showPrompt ? postJSON("/tokenize", req.tokenize, controller.signal)
      .then((r) => r.token_strs.map(tokenText)).catch(() => null) : null;
    const state = { text: "", tokens: 0, usage: null, finish: null, prompt: null, start: performance.now(), first: null };
    let outcome = "done";
    let queued = false;
    const render = () => { // the text and the scroll position, a few times a second at most
      queued = false;
      generated.textContent = state.text;
      els.output.scrollTop = els.output.scrollHeight;
    };
    try {
      els.status.textContent = "Generating…";
      await stream(req.path, req.body, controller.signal, (chunk) => {
        this.onChunk(chunk, state);
        if (!queued) { // every frame would cost more than the stream itself on a slow device
          queued = true;
          setTimeout(() => requestAnimationFrame(render), RENDER_MS);
        }
      });
    } catch (err) {
      if (err.name === "AbortError") {
        outcome = "stopped";
      } else if (err.param === "return_routing" && !this.noRouting && state.tokens === 0) {
        // the server cannot return routing for this request (the vLLM engine; a response too
        // big for routing): ask again without it, saying why
        this.noRouting = err.message;
        target.div.remove();
        if (this.mode === "chat") els.output.lastChild?.remove();
        this.controller = null;
        this.setRunning(false);
        els.prompt.value = text;
        return this.send();
      } else {
        outcome = "failed";
        this.hooks.onError(err);
      }
    }
    render();
    if (promptLabels) {
      const labels = await promptLabels;
      const p = state.prompt;
      if (labels) {
        this.routing.addPrompt(labels, p ? p.routing : null, p ? p.weights : null,
          p ? undefined : "no prompt routing received");
      }
    }
    target.div.removeAttribute("aria-busy");
    this.controller = null;
    this.setRunning(false);
    this.finish(outcome, state, text);
  }

  onChunk(chunk, state) {
    if (chunk.usage) state.usage = chunk.usage;
    if (chunk.prompt_routing) state.prompt = { routing: chunk.prompt_routing, weights: chunk.prompt_routing_weights };
    for (const choice of chunk.choices || []) {
      if (choice.index !== 0) continue;
      const chat = this.mode === "chat";
      const text = chat ? choice.delta && choice.delta.content : choice.text;
      const labels = chat ? choice.logprobs && choice.logprobs.content && choice.logprobs.content.map((e) => e.token)
        : choice.logprobs && choice.logprobs.tokens;
      if (text) state.text += text;
      if (labels && labels.length) {
        if (state.first === null) state.first = performance.now();
        state.tokens += labels.length;
        if (!this.noRouting) this.routing.addGenerated(labels);
      }
      if (choice.prompt_routing) state.prompt = { routing: choice.prompt_routing, weights: choice.prompt_routing_weights };
      if (choice.routing && choice.routing.length) this.routing.addRouting(choice.routing, choice.routing_weights);
      if (choice.finish_reason) state.finish = choice.finish_reason;
    }
  }

  finish(outcome, state, promptText) {
    const { els } = this;
    const routing = this.noRouting ? { finish() {} } : this.routing;
    this.noRouting = null;
    const seconds = (performance.now() - state.start) / 1000;
    const tokens = state.usage ? state.usage.completion_tokens : state.tokens;
    if (this.mode === "chat" && outcome !== "failed") {
      this.history.push({ role: "user", content: promptText }, { role: "assistant", content: state.text });
    }
    if (outcome !== "failed") this.lastText = state.text;
    const rate = seconds > 0 ? ` (${(tokens / seconds).toFixed(1)} tokens/s)` : "";
    const ttft = state.first !== null ? `, first token after ${((state.first - state.start) / 1000).toFixed(2)} s` : "";
    if (outcome === "stopped") {
      els.status.textContent = `Stopped after ${tokens} tokens.`;
      routing.finish("stopped");
    } else if (outcome === "failed") {
      els.status.textContent = "The request failed.";
      routing.finish("failed");
    } else {
      els.status.textContent = `Done: ${tokens} tokens in ${seconds.toFixed(2)} s${rate}${ttft}; `
        + `finish reason: ${state.finish || "unknown"}.`;
      routing.finish(`finish reason: ${state.finish || "unknown"}`);
    }
    els.status.dataset.state = outcome;
    this.hooks.onFinished();
  }

  setRunning(running) {
    this.els.send.disabled = running;
    this.els.stop.disabled = !running;
    this.els.status.dataset.state = running ? "running" : "idle";
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  clear() {
    this.stop();
    this.history = [];
    this.lastText = "";
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Responses stream here.";
    this.els.output.replaceChildren(empty);
    this.els.status.textContent = "";
    const facts = this.hooks.facts() || {};
    this.routing.reset(facts.num_moe_layers || 0);
  }

  async copy() {
    const text = this.lastText;
    if (!text) {
      this.els.status.textContent = "Nothing to copy yet.";
      return;
    }
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      const area = document.createElement("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    this.els.status.textContent = "Copied the last response.";
  }
}
