// The network view: polls /api/network (served by `gossipfl dashboard` or a testbed, which reads every node)
// every 2 s and draws all nodes at once. Every string from a node (id, url, error) is set as text.
import { LineChart } from "./chart.js";
import { connected, disconnected, el, fill, getJSON, num, poll, rate, setText, svg } from "./common.js";

const POLL_MS = 2000;
const GRAPH_W = 640;
const GRAPH_H = 320;

const state = { updates: 0, doc: null, colours: new Map() };
window.gossipflDashboard = state; // read by the browser tests

const charts = {
  accuracy: new LineChart(document.getElementById("chart-accuracy"), { yLabel: "accuracy", yMax: 1, empty: "no evaluation yet" }),
  consensus: new LineChart(document.getElementById("chart-consensus"), { yLabel: "distance", log: true, empty: "needs the models of two nodes" }),
};

/** How the page tells nodes apart: the id, or the url of a node that never answered. */
const key = (n) => n.id || n.url;

/** A colour per node, kept for the page's life: hues a golden angle apart in the order nodes appear, so
 * that ids alike (node-1, node-2) still look different, which a hash of the id does not ensure. */
function colour(name) {
  if (!state.colours.has(name)) state.colours.set(name, `hsl(${Math.round((200 + state.colours.size * 137.508) % 360)}, 65%, 42%)`);
  return state.colours.get(name);
}

/** ``x`` as 1.23e-4, or "–" when it is not a finite number (the server writes null for one it cannot). */
function exp(x) {
  return typeof x === "number" && Number.isFinite(x) ? x.toExponential(2) : "–";
}

/** ``url`` if it is an http(s) address (a link to anything else is not made). */
function webUrl(url) {
  return typeof url === "string" && /^https?:\/\/[^\s]+$/i.test(url) ? url : null;
}

/** A label for the graph: short, without the scheme of a url. */
function short(name, n = 20) {
  const s = name.replace(/^https?:\/\//, "");
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}

async function tick() {
  const doc = await getJSON("/api/network");
  state.doc = doc;
  render(doc);
  state.updates += 1;
  connected();
}

function onError(e) {
  disconnected("the dashboard server", e);
}

function card(label, value, note) {
  return el("div", { class: "card" }, el("div", { class: "label", text: label }), el("div", { class: "value", text: value }),
    note ? el("div", { class: "note", text: note }) : null);
}

function render(doc) {
  const nodes = doc.nodes;
  const up = nodes.filter((n) => n.reachable);
  const accs = up.map((n) => n.accuracy).filter((a) => a !== null && a !== undefined);
  const exchanges = doc.edges.reduce((s, e) => s + e.count, 0);
  const last = doc.consensus.length ? doc.consensus[doc.consensus.length - 1] : null;
  setText("summary", `${nodes.length} nodes · ${up.length} reachable · read every ${doc.interval_s} s`);
  setText("edge-window", doc.edge_window_s);
  fill("cards",
    card("nodes", `${up.length} / ${nodes.length}`, "reachable / watched"),
    card("mean accuracy", num(accs.length ? accs.reduce((a, b) => a + b, 0) / accs.length : null),
      accs.length ? `min ${num(accs.reduce((a, b) => Math.min(a, b)))} · max ${num(accs.reduce((a, b) => Math.max(a, b)))}` : null),
    card("consensus distance", last ? exp(last[2] ?? last[1]) : "–",
      last ? `${last[2] !== null ? "relative; " : ""}absolute ${exp(last[1])}` : "needs two models"),
    card("exchanges", String(exchanges), `in the last ${doc.edge_window_s} s`));

  charts.accuracy.update(nodes.map((n) => ({
    name: key(n), colour: colour(key(n)), points: n.series, dashed: n.reachable === false,
  })));
  const relative = doc.consensus.some((r) => r[2] !== null);
  setText("consensus-note", relative ? "relative to the mean's norm" : "absolute");
  charts.consensus.update([{ name: "consensus distance", colour: "#5b3fb5",
    points: doc.consensus.map(([t, d, r]) => [t, relative ? r : d]) }]);
  renderGraph(nodes, doc.edges);
  renderTable(nodes);
}

function renderGraph(nodes, edges) {
  const cx = GRAPH_W / 2;
  const cy = GRAPH_H / 2;
  const r = GRAPH_H / 2 - 36;
  const at = new Map();
  nodes.forEach((n, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, nodes.length);
    at.set(key(n), { x: cx + r * Math.cos(a), y: cy + r * Math.sin(a), cos: Math.cos(a), sin: Math.sin(a) });
  });
  const root = svg("svg", { viewBox: `0 0 ${GRAPH_W} ${GRAPH_H}`, class: "chart graph", role: "img", "aria-label": "exchanges between nodes" });
  const most = edges.reduce((m, e) => Math.max(m, e.count), 1); // (a loop: a spread of many edges overflows the stack)
  for (const e of edges) {
    const p = at.get(e.a);
    const q = at.get(e.b);
    if (!p || !q) continue; // an exchange with a node that is not watched
    root.append(svg("line", {
      x1: p.x.toFixed(1), y1: p.y.toFixed(1), x2: q.x.toFixed(1), y2: q.y.toFixed(1), class: "edge",
      "stroke-width": (1 + 6 * Math.sqrt(e.count / most)).toFixed(2), "data-a": e.a, "data-b": e.b, "data-count": e.count,
    }, svg("title", { text: `${e.a} – ${e.b}: ${e.count} exchanges` })));
  }
  for (const n of nodes) {
    const p = at.get(key(n));
    const down = n.reachable === false;
    const dot = svg("circle", { cx: p.x.toFixed(1), cy: p.y.toFixed(1), r: 9, class: down ? "node-dot unreachable" : "node-dot",
      fill: down ? null : colour(key(n)), "data-node": key(n) },
      svg("title", { text: down ? `${key(n)}: unreachable: ${n.error || ""}` : key(n) }));
    const right = p.cos >= -0.01;
    const label = svg("text", { x: (p.x + 15 * p.cos).toFixed(1), y: (p.y + 15 * p.sin + 4).toFixed(1), class: "node-label",
      "text-anchor": Math.abs(p.cos) < 0.2 ? "middle" : right ? "start" : "end", text: short(key(n)) });
    root.append(dot, label);
  }
  if (!nodes.length) root.append(svg("text", { x: cx, y: cy, "text-anchor": "middle", class: "empty", text: "no node yet" }));
  document.getElementById("graph").replaceChildren(root);
}

function nameCell(n) {
  const url = webUrl(n.url);
  if (!url) return el("td", { text: key(n) });
  return el("td", {}, el("a", { href: `${url.replace(/\/+$/, "")}/`, rel: "noopener noreferrer", text: key(n) }));
}

function renderTable(nodes) {
  const rows = nodes.map((n) => {
    const st = n.reachable === true ? "reachable" : n.reachable === false ? "unreachable" : "not read yet";
    return el("tr", { "data-node": key(n), class: n.reachable === false ? "down" : null },
      nameCell(n), el("td", { text: n.url }),
      el("td", { class: `state ${st.replaceAll(" ", "-")}` }, st, n.error ? el("small", { class: "error", text: ` ${n.error}` }) : null),
      el("td", { text: num(n.accuracy) }), el("td", { text: num(n.loss) }), el("td", { text: n.age ?? "–" }),
      el("td", { text: n.peers ?? "–" }), el("td", { text: n.exchanges_ok ?? "–" }),
      el("td", { text: n.upload_rate === null || n.upload_rate === undefined ? "–" : rate(n.upload_rate) }));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 9, class: "empty", text: "no node yet: give --seeds, or wait for mDNS" })));
  document.querySelector("#nodes tbody").replaceChildren(...rows);
}

poll(tick, POLL_MS, onError);
