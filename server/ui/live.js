// The live panel: serving numbers from /v1/moe/stats and the per-layer expert-load heatmap
// from /v1/moe/routing, refreshed every few seconds (and right after each response).

import { getJSON } from "./api.js";

const POLL_MS = 3000;
const LOW = [244, 246, 251]; // heatmap colour for no load
const HIGH = [8, 48, 107]; // ... and for the busiest expert of the layer

function mix(t) {
  const c = LOW.map((lo, i) => Math.round(lo + (HIGH[i] - lo) * t));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function fmt(n, digits = 0) {
  return Number.isFinite(n) ? n.toLocaleString("en-US", { maximumFractionDigits: digits }) : "–";
}

export class LivePanel {
  constructor(els, onError) {
    this.els = els; // {panel, summary, canvas, tip, layerBody, devices, deviceList, running, ...}
    this.onError = onError;
    this.range = "window";
    this.last = null; // previous stats sample, for tokens/s
    this.routing = null;
    this.timer = null;
    this.updates = 0;
    this.stopped = true;
    els.canvas.addEventListener("mousemove", (ev) => this.onHover(ev));
    els.canvas.addEventListener("mouseleave", () => { els.tip.textContent = ""; });
    window.addEventListener("resize", () => this.draw());
  }

  setRange(range) {
    this.range = range;
    this.render();
  }

  start() {
    this.stopped = false;
    if (!this.timer) this.tick();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
  }

  async tick() {
    clearTimeout(this.timer);
    this.timer = null;
    if (this.stopped) return;
    if (!document.hidden) await this.refresh();
    if (!this.stopped) this.timer = setTimeout(() => this.tick(), POLL_MS);
  }

  async refresh() {
    try {
      const [stats, routing] = await Promise.all([getJSON("/v1/moe/stats"), getJSON("/v1/moe/routing")]);
      this.showStats(stats);
      this.routing = routing;
      this.updates++;
      this.render();
      return stats;
    } catch (err) {
      if (err.status === 401) this.stop();
      this.onError(err);
      return null;
    }
  }

  showStats(s) {
    const { els } = this;
    els.running.textContent = fmt(s.num_requests_running);
    els.waiting.textContent = fmt(s.num_requests_waiting);
    els.kv.textContent = `${fmt(100 * s.kv_cache_usage_perc, 1)} %`;
    if (this.last && s.time > this.last.time) {
      const rate = (s.generation_tokens_total - this.last.generation_tokens_total) / (s.time - this.last.time);
      els.tps.textContent = fmt(Math.max(0, rate), 1);
    }
    this.last = s;
    els.panel.dataset.running = s.num_requests_running;
  }

  counts() {
    const r = this.routing;
    if (!r || !r.layers || !r.layers.length) return null;
    return r.layers.map((l) => (this.range === "window" ? l.window_tokens : l.total_tokens));
  }

  render() {
    const r = this.routing;
    const { els } = this;
    if (!r) return;
    els.windowLabel.textContent = `Last ${fmt(r.window_seconds)} s`;
    const counts = this.counts();
    const total = r.layers.reduce((a, l) => a + l.total_tokens.reduce((x, y) => x + y, 0), 0);
    els.panel.dataset.totalAssignments = total;
    els.panel.dataset.updates = this.updates;
    if (!counts) {
      els.summary.textContent = "No tokens routed yet.";
    } else {
      const inRange = counts.reduce((a, row) => a + row.reduce((x, y) => x + y, 0), 0);
      const imb = r.layers.map((l) => l.imbalance).filter((v) => typeof v === "number");
      const worst = imb.length ? Math.max(...imb) : null;
      els.summary.textContent = `${fmt(inRange)} token-expert assignments ${this.range === "window"
        ? `in the last ${fmt(r.window_seconds)} s` : "since start"} over ${r.num_layers} layers × ${r.num_experts} experts`
        + (worst !== null ? `; worst layer imbalance ${worst.toFixed(2)} (1.00 = even)` : "");
    }
    this.renderTable(counts);
    this.renderDevices();
    this.draw();
  }

  renderTable(counts) {
    const r = this.routing;
    const rows = (counts || []).map((row, layer) => {
      const tr = document.createElement("tr");
      const sum = row.reduce((a, b) => a + b, 0);
      const busiest = sum ? row.indexOf(Math.max(...row)) : null;
      const imb = r.layers[layer].imbalance;
      const cells = [`L${layer}`, fmt(sum), typeof imb === "number" ? imb.toFixed(2) : "–",
        busiest === null ? "–" : `${busiest} (${fmt((100 * row[busiest]) / sum, 0)} %)`];
      cells.forEach((text, i) => {
        const cell = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) cell.scope = "row";
        cell.textContent = text;
        tr.appendChild(cell);
      });
      return tr;
    });
    this.els.layerBody.replaceChildren(...rows);
  }

  renderDevices() {
    const r = this.routing;
    const { els } = this;
    const devices = Object.entries(r.device_tokens || {});
    const placed = {};
    for (const p of r.placement || []) placed[p.device] = (placed[p.device] || 0) + 1;
    const names = [...new Set([...devices.map(([d]) => d), ...Object.keys(placed)])].sort();
    els.devices.hidden = names.length === 0;
    const total = devices.reduce((a, [, v]) => a + v, 0);
    els.deviceList.replaceChildren(...names.map((name) => {
      const li = document.createElement("li");
      const tokens = r.device_tokens[name] || 0;
      const share = total ? `${fmt((100 * tokens) / total, 1)} % of expert computations` : "no computations yet";
      li.textContent = `${name}: ${share}` + (placed[name] ? `; holds ${placed[name]} expert replicas (all layers together)` : "");
      return li;
    }));
  }

  draw() {
    const { canvas } = this.els;
    const counts = this.counts();
    const ctx = canvas.getContext("2d");
    const width = Math.max(200, canvas.parentElement.clientWidth);
    if (!counts) {
      canvas.width = width;
      canvas.height = 0;
      return;
    }
    const layers = counts.length;
    const experts = counts[0].length;
    const rowH = Math.max(6, Math.min(20, Math.floor(240 / layers)));
    const dpr = window.devicePixelRatio || 1;
    canvas.style.height = `${rowH * layers}px`;
    canvas.width = Math.floor(width * dpr);
    canvas.height = Math.floor(rowH * layers * dpr);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const cellW = width / experts;
    counts.forEach((row, layer) => {
      const peak = Math.max(1, ...row);
      row.forEach((v, e) => {
        ctx.fillStyle = mix(v / peak);
        ctx.fillRect(e * cellW, layer * rowH, Math.ceil(cellW), rowH - 1);
      });
    });
    this.geometry = { cellW, rowH, layers, experts };
    canvas.setAttribute("aria-label", `Expert-load heatmap: ${layers} layers (rows) by ${experts} experts `
      + "(columns); darker is busier within the layer. The table below lists the same numbers per layer.");
  }

  onHover(ev) {
    const g = this.geometry;
    const counts = this.counts();
    if (!g || !counts) return;
    const rect = this.els.canvas.getBoundingClientRect();
    const e = Math.floor((ev.clientX - rect.left) / g.cellW);
    const layer = Math.floor((ev.clientY - rect.top) / g.rowH);
    if (layer < 0 || layer >= g.layers || e < 0 || e >= g.experts) return;
    const where = (this.routing.placement || []).filter((p) => p.layer === layer && p.expert === e).map((p) => p.device);
    this.els.tip.textContent = `layer ${layer}, expert ${e}: ${fmt(counts[layer][e])} assignments`
      + (where.length ? `; placed on ${[...new Set(where)].join(", ")}` : "");
  }
}
