// Shared by the node and network dashboards: building DOM safely, formatting, and reading the API.
// Every string that comes from a node or a peer goes into the page as text (textContent, setAttribute),
// never as markup: nothing here touches innerHTML.

const SVG_NS = "http://www.w3.org/2000/svg";
const TOKEN_KEY = "gossipfl-read-token";
const TOKEN_RE = /^[\x21-\x7e]+$/; // what a read token is made of (and what a header can carry)

/** An element with attributes and children (strings become text nodes). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

/** An SVG element with attributes and children. */
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = String(v);
    else if (k.startsWith("on")) throw new Error("event handlers are added with addEventListener");
    else node.setAttribute(k, String(v));
  }
}

function append(node, children) {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replace the children of the element with id ``id``. */
export function fill(id, ...children) {
  const node = document.getElementById(id);
  node.replaceChildren();
  append(node, children);
  return node;
}

export function setText(id, value) {
  document.getElementById(id).textContent = value === null || value === undefined ? "–" : String(value);
}

export function num(x, digits = 4) {
  return x === null || x === undefined || !Number.isFinite(x) ? "–" : x.toFixed(digits);
}

export function bytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function rate(n) {
  return n === null || n === undefined ? "unlimited" : `${bytes(n)}/s`;
}

export function ago(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  if (seconds < 60) return `${seconds.toFixed(1)} s ago`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(1)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  if (seconds < 1) return `${(seconds * 1000).toFixed(1)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  return `${(seconds / 60).toFixed(1)} min`;
}

/** A stable colour for a name (node ids): a hue from a hash of it (FNV-1a, then a final mix so that names
 * differing in one last character, node0 and node1, get far-apart hues). */
export function colour(name) {
  let h = 0x811c9dc5;
  for (const ch of String(name)) h = Math.imul(h ^ ch.codePointAt(0), 0x01000193) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  h = (h ^ (h >>> 16)) >>> 0;
  return `hsl(${h % 360}, 65%, 42%)`;
}

export class Unauthorized extends Error {}

/** The read token the user typed, kept for this browser tab only (sessionStorage), never in a URL. */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** GET a JSON document from this server, with the read token when one was given. */
export async function getJSON(path, timeoutMs = 8000) {
  const headers = { Accept: "application/json" };
  const t = token();
  if (t && !TOKEN_RE.test(t)) throw new Unauthorized("the stored read token cannot be sent");
  if (t) headers.Authorization = `Bearer ${t}`;
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), timeoutMs);
  try {
    const resp = await fetch(path, { headers, cache: "no-store", signal: ctl.signal, credentials: "omit" });
    if (resp.status === 401) throw new Unauthorized("a read token is required");
    if (!resp.ok) {
      let detail = resp.statusText;
      try {
        detail = (await resp.json()).error || detail;
      } catch (_) {
        /* not JSON */
      }
      throw new Error(`${path}: ${resp.status} ${detail}`);
    }
    return await resp.json();
  } finally {
    clearTimeout(timer);
  }
}

/** Ask for the read token once: show the form, resolve when it is submitted. */
export function askToken(message) {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  setText("token-message", message);
  form.hidden = false;
  input.focus();
  return new Promise((resolve) => {
    const submit = (ev) => {
      ev.preventDefault();
      const value = input.value.trim();
      input.value = "";
      if (!TOKEN_RE.test(value)) {
        // (a header cannot carry it: fetch would throw before sending anything)
        setText("token-message", "A read token is printable ASCII without spaces. Read token:");
        return;
      }
      form.removeEventListener("submit", submit);
      setToken(value);
      form.hidden = true;
      resolve();
    };
    form.addEventListener("submit", submit);
  });
}

/** Say on the page (#connection) that the last poll worked. */
export function connected() {
  const conn = document.getElementById("connection");
  conn.className = "connection ok";
  conn.textContent = `updated ${new Date().toTimeString().slice(0, 8)}`;
}

/** Say on the page (#connection) that ``what`` could not be read, and why. */
export function disconnected(what, e) {
  const conn = document.getElementById("connection");
  conn.className = "connection down";
  conn.textContent = `cannot reach ${what}: ${e.message || e}`;
}

/** Call ``tick`` now and then every ``ms`` (never two at once), asking for the token on a 401. */
export function poll(tick, ms, onError) {
  let stopped = false;
  async function loop() {
    while (!stopped) {
      const started = performance.now();
      try {
        await tick();
      } catch (e) {
        if (e instanceof Unauthorized) {
          await askToken(token() ? "That token was refused. Read token:" : "This node needs its read token:");
          continue;
        }
        onError(e);
      }
      await new Promise((r) => setTimeout(r, Math.max(0, ms - (performance.now() - started))));
    }
  }
  loop();
  return () => {
    stopped = true;
  };
}
