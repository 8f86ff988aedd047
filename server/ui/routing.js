// The routing view: a table with one column per token and one row per MoE layer; each cell
// holds the token's top-k expert ids at that layer, coloured by expert. Hover, tap or focus a
// token to see its experts (and router weights, when the server sends `routing_weights`).

export function expertColor(expert) {
  // golden-angle hues: neighbouring expert ids get far-apart colours; light enough for dark text
  return `hsl(${(expert * 137.508) % 360}deg 70% 82%)`;
}

export function visibleToken(text) {
  if (text === "") return "∅";
  const shown = text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣");
  return shown.length > 14 ? `${shown.slice(0, 13)}…` : shown;
}

function describeExperts(experts, weights) {
  return experts
    .map((e, i) => (weights && typeof weights[i] === "number" ? `${e} (${weights[i].toFixed(2)})` : String(e)))
    .join(", ");
}

export class RoutingView {
  constructor(table, detail, caption) {
    this.table = table;
    this.head = table.tHead.rows[0];
    this.body = table.tBodies[0];
    this.detail = detail;
    this.caption = caption;
    this.cols = [];
    this.numPrompt = 0;
    this.nextRouted = 0; // index (among generated columns) of the next column to receive routing
    this.pinned = null;
    table.addEventListener("mouseover", (ev) => this.onPointer(ev, false));
    table.addEventListener("click", (ev) => this.onPointer(ev, true));
    table.addEventListener("keydown", (ev) => this.onKey(ev));
    table.addEventListener("focusin", (ev) => {
      const col = ev.target.closest("[data-col]");
      if (col) this.show(Number(col.dataset.col));
    });
    this.reset(0);
  }

  reset(numLayers, note = "No response yet.") {
    this.cols = [];
    this.numPrompt = 0;
    this.nextRouted = 0;
    this.pinned = null;
    this.numLayers = numLayers;
    while (this.head.cells.length > 1) this.head.deleteCell(1);
    this.body.replaceChildren();
    for (let layer = 0; layer < numLayers; layer++) {
      const row = this.body.insertRow();
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = `L${layer}`;
      row.appendChild(th);
    }
    this.detail.replaceChildren();
    this.caption.textContent = note;
  }

  get generatedCount() {
    return this.cols.length - this.numPrompt;
  }

  // Prompt tokens go before the generated ones. `routing` may cover only the last tokens of
  // the prompt (a prefix-cache hit skips the cached part): it is aligned to the end.
  addPrompt(labels, routing, weights, whyMissing) {
    const why = whyMissing || "prompt token served from the prefix cache: not run through the model again";
    const skipped = Math.max(0, labels.length - (routing ? routing.length : 0));
    labels.forEach((label, i) => {
      const r = i >= skipped ? routing[i - skipped] : null;
      const w = i >= skipped && weights ? weights[i - skipped] : null;
      const col = this.insertColumn(this.numPrompt, "prompt", label);
      this.numPrompt++;
      if (r) this.fill(col, r, w);
      else this.markUnrouted(col, why);
    });
    this.renumber();
  }

  addGenerated(labels) {
    for (const label of labels) this.insertColumn(this.cols.length, "gen", label);
    this.updateCaption();
    const box = this.table.parentElement; // keep the newest token in view while streaming
    box.scrollLeft = box.scrollWidth;
  }

  // `entries[t][layer]` = expert ids of the next generated token(s) in order.
  addRouting(entries, weights) {
    entries.forEach((layers, i) => {
      const col = this.cols[this.numPrompt + this.nextRouted];
      if (!col) return;
      this.nextRouted++;
      this.fill(col, layers, weights ? weights[i] : null);
    });
  }

  finish(message) {
    for (let i = this.numPrompt + this.nextRouted; i < this.cols.length; i++) {
      this.markUnrouted(this.cols[i], "the last sampled token is never fed through the model, so it has no routing");
    }
    this.updateCaption(message);
  }

  updateCaption(extra = "") {
    const gen = this.generatedCount;
    const parts = [`${gen} generated token${gen === 1 ? "" : "s"}`];
    if (this.numPrompt) parts.push(`${this.numPrompt} prompt tokens`);
    parts.push(`${this.numLayers} MoE layers`);
    this.caption.textContent = parts.join(" · ") + (extra ? ` · ${extra}` : "");
  }

  insertColumn(index, kind, text) {
    const th = document.createElement("th");
    th.scope = "col";
    th.className = `tok ${kind}`;
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = visibleToken(text);
    button.tabIndex = this.cols.length === 0 ? 0 : -1;
    th.appendChild(button);
    const before = this.head.cells[index + 1] || null;
    this.head.insertBefore(th, before);
    const tds = [];
    for (const row of this.body.rows) {
      const td = document.createElement("td");
      td.className = `pending ${kind}`;
      td.textContent = "…";
      row.insertBefore(td, row.cells[index + 1] || null);
      tds.push(td);
    }
    const col = { kind, text, th, button, tds, routing: null, weights: null };
    this.cols.splice(index, 0, col);
    if (kind === "gen") this.setIndex(col, index);
    return col;
  }

  setIndex(col, index) {
    col.th.dataset.col = index;
    for (const td of col.tds) td.dataset.col = index;
  }

  renumber() {
    this.cols.forEach((col, i) => {
      this.setIndex(col, i);
      col.button.tabIndex = i === 0 ? 0 : -1;
    });
  }

  fill(col, layers, weights) {
    col.routing = layers;
    col.weights = weights;
    col.tds.forEach((td, layer) => {
      const experts = layers[layer] || [];
      const w = weights ? weights[layer] : null;
      td.className = `cell ${col.kind}`;
      td.textContent = experts.join(" ");
      td.dataset.experts = experts.join(",");
      const colors = experts.map(expertColor);
      const step = 100 / Math.max(1, colors.length);
      td.style.background = colors.length > 1
        ? `linear-gradient(90deg, ${colors.map((c, i) => `${c} ${i * step}% ${(i + 1) * step}%`).join(", ")})`
        : colors[0] || "";
      td.title = `layer ${layer}: experts ${describeExperts(experts, w)}`;
    });
  }

  markUnrouted(col, why) {
    col.why = why;
    for (const td of col.tds) {
      td.className = `none ${col.kind}`;
      td.textContent = "–";
      td.title = why;
    }
  }

  onPointer(ev, pin) {
    const el = ev.target.closest("[data-col]");
    if (!el) return;
    const index = Number(el.dataset.col);
    if (pin) this.pinned = this.pinned === index ? null : index;
    if (pin || this.pinned === null) this.show(index);
  }

  onKey(ev) {
    const el = ev.target.closest("th[data-col]");
    if (!el) return;
    const index = Number(el.dataset.col);
    const moves = { ArrowLeft: index - 1, ArrowRight: index + 1, Home: 0, End: this.cols.length - 1 };
    if (!(ev.key in moves)) return;
    ev.preventDefault();
    const target = this.cols[Math.max(0, Math.min(this.cols.length - 1, moves[ev.key]))];
    for (const col of this.cols) col.button.tabIndex = -1;
    target.button.tabIndex = 0;
    target.button.focus();
  }

  show(index) {
    const col = this.cols[index];
    if (!col) return;
    for (const c of this.cols) c.th.classList.toggle("selected", c === col);
    const kind = col.kind === "prompt" ? "prompt token" : "generated token";
    const position = col.kind === "prompt" ? index + 1 : index - this.numPrompt + 1;
    const title = document.createElement("p");
    title.className = "detail-title";
    title.textContent = `${kind} ${position}: “${col.text}”`;
    const parts = [title];
    if (!col.routing) {
      const p = document.createElement("p");
      p.textContent = col.why || "routing not received yet";
      parts.push(p);
    } else {
      const list = document.createElement("ul");
      list.className = "detail-list";
      col.routing.forEach((experts, layer) => {
        const li = document.createElement("li");
        const name = document.createElement("span");
        name.className = "layer-name";
        name.textContent = `L${layer}:`;
        li.appendChild(name);
        experts.forEach((e, i) => {
          li.append(i ? ", " : " ");
          const chip = document.createElement("span");
          chip.className = "chip";
          chip.style.background = expertColor(e);
          const w = col.weights && col.weights[layer] ? col.weights[layer][i] : null;
          chip.textContent = typeof w === "number" ? `expert ${e} · ${w.toFixed(2)}` : `expert ${e}`;
          li.appendChild(chip);
        });
        list.appendChild(li);
      });
      parts.push(list);
      if (!col.weights) {
        const note = document.createElement("p");
        note.className = "hint";
        note.textContent = "This server does not report router weights; expert ids only.";
        parts.push(note);
      }
    }
    this.detail.replaceChildren(...parts);
  }
}
