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

const FLUSH_MS = 150; // new tokens are drawn in batches, a few times a second...
const SLICE_MS = 12; // ...in slices of this much work, so that a click (Stop) never waits long
const CHUNK = 32; // tokens per table: appending a token lays out one small table, not all of them

// Each column is kept as data ({kind, text, routing, weights, why}) and drawn by flush() into a
// row of tables of CHUNK tokens each (every table has the layer names as row headers): laying
// out one table of n columns costs O(n), so a single table would make long responses slow.
export class RoutingView {
  constructor(container, detail, caption) {
    this.container = container;
    this.detail = detail;
    this.caption = caption;
    this.flushTimer = null;
    // the model's expert count: router ids from it up are zero-computation experts (LongCat)
    this.numExperts = null;
    container.addEventListener("mouseover", (ev) => this.onPointer(ev, false));
    container.addEventListener("click", (ev) => this.onPointer(ev, true));
    container.addEventListener("keydown", (ev) => this.onKey(ev));
    container.addEventListener("focusin", (ev) => {
      const col = ev.target.closest("[data-col]");
      if (col) this.show(Number(col.dataset.col));
    });
    this.reset(0);
  }

  reset(numLayers, note = "No response yet.") {
    clearTimeout(this.flushTimer);
    this.flushTimer = null;
    this.cols = [];
    this.numPrompt = 0;
    this.nextRouted = 0; // index (among generated columns) of the next column to receive routing
    this.pinned = null;
    this.numLayers = numLayers;
    this.note = "";
    this.dirty = new Set(); // drawn columns whose routing arrived since
    this.clearTables();
    this.detail.replaceChildren();
    this.caption.textContent = note;
  }

  clearTables() {
    this.chunks = [];
    this.drawn = 0; // columns are drawn in order: cols[0 .. drawn) are in the tables
    this.container.replaceChildren();
    this.chunk(0); // the layer names show before the first token
  }

  chunk(i) { // the table holding tokens [i * CHUNK, (i + 1) * CHUNK)
    while (this.chunks.length <= i) {
      const table = document.createElement("table");
      table.className = "routing";
      const caption = table.createCaption();
      caption.className = "visually-hidden";
      const head = table.createTHead().insertRow();
      const corner = document.createElement("th");
      corner.scope = "col";
      corner.className = "corner";
      corner.textContent = "Layer";
      head.appendChild(corner);
      const body = table.createTBody();
      const rows = [];
      for (let layer = 0; layer < this.numLayers; layer++) {
        const row = body.insertRow();
        const th = document.createElement("th");
        th.scope = "row";
        th.textContent = `L${layer}`;
        row.appendChild(th);
        rows.push(row);
      }
      this.container.appendChild(table);
      this.chunks.push({ table, caption, head, rows });
    }
    return this.chunks[i];
  }

  get generatedCount() {
    return this.cols.length - this.numPrompt;
  }

  // Prompt tokens go before the generated ones. `routing` may cover only the last tokens of
  // the prompt (a prefix-cache hit skips the cached part): it is aligned to the end.
  addPrompt(labels, routing, weights, whyMissing) {
    const why = whyMissing || "prompt token served from the prefix cache: not run through the model again";
    const skipped = Math.max(0, labels.length - (routing ? routing.length : 0));
    const cols = labels.map((text, i) => ({
      kind: "prompt", text, routing: i >= skipped ? routing[i - skipped] : null,
      weights: i >= skipped && weights ? weights[i - skipped] : null, why: i >= skipped ? null : why,
    }));
    this.cols.splice(this.numPrompt, 0, ...cols);
    this.numPrompt += cols.length;
    for (const col of this.cols) col.tds = null; // prompt columns go in front: draw everything again
    this.clearTables();
    this.flush(true);
  }

  addGenerated(labels) {
    for (const text of labels) this.cols.push({ kind: "gen", text, routing: null, weights: null, why: null });
    this.scheduleFlush();
  }

  // `entries[t][layer]` = expert ids of the next generated token(s) in order.
  addRouting(entries, weights) {
    entries.forEach((layers, i) => {
      const col = this.cols[this.numPrompt + this.nextRouted];
      if (!col) return;
      this.nextRouted++;
      col.routing = layers;
      col.weights = weights ? weights[i] : null;
      this.dirty.add(col);
    });
    this.scheduleFlush();
  }

  finish(message) {
    for (let i = this.numPrompt + this.nextRouted; i < this.cols.length; i++) {
      this.cols[i].why = "the last sampled token is never fed through the model, so it has no routing";
      this.dirty.add(this.cols[i]);
    }
    this.note = message;
    this.flush(true);
  }

  scheduleFlush() {
    if (this.flushTimer === null) {
      this.flushTimer = setTimeout(() => requestAnimationFrame(() => this.flush(false)), FLUSH_MS);
    }
  }

  // Draw what changed: new routing into drawn columns, then new columns at the end; with
  // `all` false, stop after SLICE_MS and go on in a later task.
  flush(all) {
    clearTimeout(this.flushTimer);
    this.flushTimer = null;
    const start = performance.now();
    for (const col of this.dirty) if (col.tds) this.paint(col); // not drawn yet: drawColumn paints it
    this.dirty.clear();
    const before = this.drawn;
    while (this.drawn < this.cols.length) {
      if (!all && performance.now() - start > SLICE_MS) {
        this.flushTimer = setTimeout(() => this.flush(false), 0);
        break;
      }
      this.drawColumn(this.cols[this.drawn], this.drawn);
      this.drawn++;
    }
    this.chunks.forEach((c, i) => { // touch only the captions that change: a change lays out the table again
      const text = `Routing of tokens ${i * CHUNK + 1} to ${Math.min(this.drawn, (i + 1) * CHUNK)}`;
      if (c.caption.textContent !== text) c.caption.textContent = text;
    });
    const gen = this.generatedCount;
    const parts = [`${gen} generated token${gen === 1 ? "" : "s"}`];
    if (this.numPrompt) parts.push(`${this.numPrompt} prompt tokens`);
    parts.push(`${this.numLayers} MoE layers`);
    this.caption.textContent = parts.join(" · ") + (this.note ? ` · ${this.note}` : "");
    if (this.drawn > before) { // keep the newest token in view (in the next frame: no forced layout here)
      requestAnimationFrame(() => {
        const box = this.container.parentElement;
        box.scrollLeft = box.scrollWidth;
      });
    }
  }

  drawColumn(col, index) { // appended: columns are drawn in order
    const chunk = this.chunk(Math.floor(index / CHUNK));
    const th = document.createElement("th");
    th.scope = "col";
    th.className = `tok ${col.kind}`;
    th.dataset.col = index;
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = visibleToken(col.text);
    button.tabIndex = index === 0 ? 0 : -1;
    th.appendChild(button);
    chunk.head.appendChild(th);
    col.th = th;
    col.button = button;
    col.tds = chunk.rows.map((row) => {
      const td = document.createElement("td");
      td.dataset.col = index;
      row.appendChild(td);
      return td;
    });
    this.paint(col);
  }

  paint(col) {
    col.tds.forEach((td, layer) => {
      if (!col.routing) {
        td.className = `${col.why ? "none" : "pending"} ${col.kind}`;
        td.textContent = col.why ? "–" : "…";
        td.title = col.why || "routing not received yet";
        td.style.background = "";
        delete td.dataset.experts;
        return;
      }
      const experts = col.routing[layer] || [];
      const w = col.weights ? col.weights[layer] : null;
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
    if (!target.button) this.flush(true);
    for (const col of this.cols) col.button.tabIndex = -1;
    target.button.tabIndex = 0;
    target.button.focus();
  }

  show(index) {
    const col = this.cols[index];
    if (!col) return;
    if (index >= this.drawn) this.flush(true);
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
          const zero = this.numExperts != null && e >= this.numExperts;
          const name = zero ? `zero-computation expert ${e}` : `expert ${e}`;
          chip.textContent = typeof w !== "number" ? name
            : w === 0 ? `${name} · 0 (dropped over capacity)` : `${name} · ${w.toFixed(2)}`;
          li.appendChild(chip);
        });
        list.appendChild(li);
      });
      parts.push(list);
      if (!col.weights || !col.weights.length) {
        const note = document.createElement("p");
        note.className = "hint";
        note.textContent = "This server does not report router weights; expert ids only.";
        parts.push(note);
      }
    }
    this.detail.replaceChildren(...parts);
  }
}
