// HTTP to this server: the API key (session storage), JSON calls and SSE streams.

const KEY_STORAGE = "moe-serve-api-key";

export class ApiError extends Error {
  constructor(status, message, param = null) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

export function getKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function setKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: the key lives for this page only */
  }
  memoryKey = key;
}

let memoryKey = "";

function headers(json) {
  const h = {};
  const key = getKey() || memoryKey;
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function errorFrom(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let param = null;
  try {
    const body = await resp.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param || null;
    }
  } catch {
    /* not JSON: keep the status line */
  }
  return new ApiError(resp.status, message, param);
}

export async function getJSON(path, signal) {
  const resp = await fetch(path, { headers: headers(false), signal, cache: "no-store" });
  if (!resp.ok) throw await errorFrom(resp);
  return resp.json();
}

export async function postJSON(path, body, signal) {
  const resp = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  if (!resp.ok) throw await errorFrom(resp);
  return resp.json();
}

const YIELD_MS = 25;
const yieldToPage = () => new Promise((resolve) => setTimeout(resolve, 0));

// POST a streaming request and call onChunk(obj) for every `data: {...}` event until
// `data: [DONE]`. An in-band `{"error": ...}` event is thrown as an ApiError. Aborting
// `signal` closes the connection, which makes the server abort the request. Reads of
// already-buffered data resolve without returning to the event loop, so the loop yields every
// YIELD_MS: on a slow page clicks (Stop) and rendering are never starved by a fast stream.
export async function stream(path, body, signal, onChunk) {
  const resp = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  if (!resp.ok) throw await errorFrom(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let lastYield = performance.now();
  for (;;) {
    if (performance.now() - lastYield > YIELD_MS) {
      await yieldToPage();
      lastYield = performance.now();
    }
    if (signal.aborted) {
      reader.cancel().catch(() => {});
      throw new DOMException("stopped", "AbortError");
    }
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          reader.cancel().catch(() => {});
          return;
        }
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(obj.error.code || 500, obj.error.message || "stream error", obj.error.param);
        onChunk(obj);
      }
    }
  }
}

// GPT-2 style byte-level BPE token strings (what /tokenize returns as token_strs) back to text.
let byteDecoder = null;
function buildByteDecoder() {
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n);
      n++;
    }
  }
  const map = new Map();
  bs.forEach((b, i) => map.set(String.fromCharCode(cs[i]), b));
  return map;
}

export function tokenText(piece) {
  if (typeof piece !== "string") return String(piece);
  byteDecoder = byteDecoder || buildByteDecoder();
  const bytes = [];
  for (const ch of piece) {
    const b = byteDecoder.get(ch);
    if (b === undefined) return piece; // not a byte-level token (e.g. a special token)
    bytes.push(b);
  }
  return new TextDecoder().decode(new Uint8Array(bytes));
}
