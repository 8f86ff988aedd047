// Wires the page together: the API key prompt, the chat panel, the routing view, the live panel.

import { getJSON, getKey, setKey } from "./api.js";
import { Chat } from "./chat.js";
import { LivePanel } from "./live.js";
import { RoutingView } from "./routing.js";

const $ = (id) => document.getElementById(id);
let facts = null; // model facts from /v1/moe/stats

const errorBox = $("error");
function showError(text) {
  errorBox.textContent = text;
  errorBox.hidden = !text;
}

function askForKey(text) {
  $("key-panel").hidden = false;
  $("key-help").textContent = text;
  $("api-key").focus();
}

function onError(err) {
  if (err && err.status === 401) {
    showError(getKey() ? `The server rejected the API key (401): ${err.message}` : `An API key is required (401): ${err.message}`);
    askForKey("This server needs an API key. It is kept for this browser tab only (session storage) "
      + "and sent as a bearer token with every request.");
    return;
  }
  showError(err && err.message ? `Error${err.status ? ` ${err.status}` : ""}: ${err.message}` : String(err));
}

const routing = new RoutingView($("routing"), $("token-detail"), $("routing-caption"));
const live = new LivePanel({
  panel: $("expert-load"), summary: $("load-summary"), canvas: $("heatmap"), tip: $("heatmap-tip"),
  layerBody: $("layer-table").tBodies[0], devices: $("devices"), deviceList: $("device-list"),
  running: $("stat-running"), waiting: $("stat-waiting"), kv: $("stat-kv"), tps: $("stat-tps"),
  windowLabel: $("load-window-label"),
}, onError);

const chat = new Chat({
  output: $("output"), prompt: $("prompt"), promptLabel: $("prompt-label"), send: $("send"), stop: $("stop"),
  status: $("status"), system: $("system"), systemRow: $("system-row"), temperature: $("temperature"),
  topP: $("top-p"), maxTokens: $("max-tokens"), seed: $("seed"),
}, routing, {
  facts: () => facts,
  showPrompt: () => $("show-prompt").checked,
  onError,
  onFinished: () => {
    live.refresh();
    setTimeout(() => live.refresh(), 1000); // an aborted request leaves the engine within a step
  },
});

async function connect() {
  try {
    const stats = await getJSON("/v1/moe/stats");
    facts = stats.model;
    showError("");
    $("key-panel").hidden = true;
    $("model-line").textContent = `${facts.id} · ${facts.architecture} · ${facts.num_moe_layers} MoE layers · `
      + `${facts.num_experts} experts, top-${facts.top_k} · ${facts.engine} engine on ${facts.device}`;
    const maxTokens = $("max-tokens");
    maxTokens.max = String(facts.max_model_len);
    routing.numExperts = facts.num_experts;
    routing.reset(facts.num_moe_layers);
    live.start();
    return true;
  } catch (err) {
    $("model-line").textContent = "Not connected.";
    onError(err);
    return false;
  }
}

$("key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  setKey($("api-key").value.trim());
  if (await connect()) $("prompt").focus();
});
$("key-button").addEventListener("click", () => askForKey("Enter the API key this server was started with "
  + "(--api-key). It is kept for this browser tab only and sent as a bearer token."));

function send() {
  showError("");
  return chat.send();
}
$("prompt-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape") chat.stop();
});
$("stop").addEventListener("click", () => chat.stop());
$("copy").addEventListener("click", () => chat.copy());
$("clear").addEventListener("click", () => chat.clear());
for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => chat.setMode(radio.value));
}
for (const radio of document.querySelectorAll("input[name=load-range]")) {
  radio.addEventListener("change", () => live.setRange(radio.value));
}
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && facts) live.refresh();
});

connect();
