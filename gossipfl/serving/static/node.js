// The node dashboard: polls /v1/status and /v1/history every 2 s and draws this node's state.
import { LineChart } from "./chart.js";
import { ago, bytes, colour, connected, disconnected, duration, el, fill, getJSON, num, poll, rate, setText } from "./common.js";

const POLL_MS = 2000;
const MAX_EVALS = 2000;
const MAX_UPLOAD = 600;

const state = {
  evalsAfter: 0,
  exchangesAfter: 0,
  evals: [],
  exchanges: [],
  upload: [],
  offset: 0, // browser clock minus node clock, seconds
  boot: null, // the node's run: it changes when the node restarts
  status: null,
  updates: 0,
};
window.gossipflDashboard = state; // read by the browser tests

const charts = {
  accuracy: new LineChart(document.getElementById("chart-accuracy"), { yLabel: "accuracy", yMax: 1 }),
  loss: new LineChart(document.getElementById("chart-loss"), { yLabel: "loss", log: true }),
  distance: new LineChart(document.getElementById("chart-distance"), { yLabel: "relative distance", log: true, empty: "no exchange yet" }),
  epsilon: new LineChart(document.getElementById("chart-epsilon"), { yLabel: "ε", yMin: 0 }),
  upload: new LineChart(document.getElementById("chart-upload"), { yLabel: "bytes/s", yMin: 0 }),
};

async function tick() {
  const [status, history] = await Promise.all([
    getJSON("/v1/status"),
    getJSON(`/v1/history?evals_after=${state.evalsAfter}&exchanges_after=${state.exchangesAfter}`),
  ]);
  state.offset = Date.now() / 1000 - history.now;
  if (state.boot !== null && history.boot !== state.boot) {
    // the node restarted: its sequence numbers start again, so read its history again from the start
    state.boot = history.boot;
    Object.assign(state, { evalsAfter: 0, exchangesAfter: 0, evals: [], exchanges: [], upload: [] });
    return tick();
  }
  state.boot = history.boot;
  if (history.evals.length) {
    state.evals.push(...history.evals);
    state.evalsAfter = history.evals[history.evals.length - 1].seq;
    if (state.evals.length > MAX_EVALS) state.evals.splice(0, state.evals.length - MAX_EVALS);
  }
  if (history.exchanges.length) {
    state.exchanges.push(...history.exchanges);
    state.exchangesAfter = history.exchanges[history.exchanges.length - 1].seq;
    if (state.exchanges.length > 100) state.exchanges.splice(0, state.exchanges.length - 100);
  }
  state.upload.push([history.now, status.upload.rate_bytes_per_s]);
  if (state.upload.length > MAX_UPLOAD) state.upload.shift();
  state.status = status;
  render(status, history.now);
  state.updates += 1;
  connected();
}

function onError(e) {
  disconnected("the node", e);
}

function card(label, value, note) {
  return el("div", { class: "card" }, el("div", { class: "label", text: label }), el("div", { class: "value", text: value }),
    note ? el("div", { class: "note", text: note }) : null);
}

function render(s, now) {
  document.title = `gossipfl · ${s.id}`;
  setText("node-id", s.id);
  setText("node-task", `task ${s.task}${s.cluster ? ` · cluster ${s.cluster}` : ""}`);
  setText("node-url", s.url);
  setText("node-state", s.failure ? `failed: ${s.failure}` : s.training ? "training" : "not training");
  setText("eval-split", s.eval_split);
  const m = s.metrics;
  const up = s.upload;
  const cards = [
    card("accuracy", num(m.accuracy)),
    card("loss", num(m.loss)),
    card("model age", String(s.age), `${s.steps} own steps · ${s.merges} merges`),
    card("served model", `${s.served.local_steps_behind} steps behind`, `age ${s.served.age}`),
    card("peers", String(s.peers.length), `${s.ignored_peers.length} ignored`),
    card("exchanges", `${s.exchanges.ok} ok`, `${s.exchanges.failed} failed · ${s.exchanges.busy} busy · ${s.exchanges.served} answered`),
    card("upload", rate(up.rate_bytes_per_s), `budget ${rate(up.max_bytes_per_s)} · ${up.compress}`),
    card("uptime", duration(s.uptime_s), s.device),
  ];
  if (s.privacy.enabled) cards.push(card("privacy ε", num(s.privacy.epsilon, 3), `of ${s.privacy.budget ?? "∞"} at δ=${s.privacy.delta}`));
  fill("cards", cards);

  const ev = state.evals;
  charts.accuracy.update([{ name: "accuracy", colour: "#1b7f5b", points: ev.map((e) => [e.t, e.accuracy]) }]);
  charts.loss.update([{ name: "loss", colour: "#b5512b", points: ev.map((e) => [e.t, e.loss]) }]);
  const byPeer = new Map();
  for (const x of state.exchanges) {
    if (x.distance === null || x.distance === undefined) continue;
    if (!byPeer.has(x.peer)) byPeer.set(x.peer, []);
    byPeer.get(x.peer).push([x.t, x.distance]);
  }
  charts.distance.opts.empty = state.exchanges.some((x) => x.distance === 0)
    ? "distance 0: the models were identical at each exchange"
    : "no exchange yet";
  charts.distance.update([...byPeer].map(([peer, pts]) => ({ name: peer, colour: colour(peer), points: pts, dots: true })));
  const budget = up.max_bytes_per_s;
  setText("upload-budget", budget ? `against a budget of ${rate(budget)}` : "(no budget set)");
  const upSeries = [{ name: "upload", colour: "#2b5fb5", points: state.upload }];
  if (budget) upSeries.push({ name: "budget", colour: "#999", dashed: true, points: state.upload.map(([t]) => [t, budget]) });
  charts.upload.update(upSeries);

  renderPrivacy(s.privacy, ev);
  renderPeers(s, now);
  renderExchanges(now);
}

function renderPrivacy(p, ev) {
  const section = document.getElementById("privacy");
  section.hidden = !p.enabled;
  if (!p.enabled) return;
  const share = p.budget && p.epsilon !== null ? Math.min(1, p.epsilon / p.budget) : null;
  const meter = el("div", { class: "meter" }, el("div", { class: "spent" }));
  if (share !== null) meter.firstChild.style.width = `${(100 * share).toFixed(1)}%`;
  fill("privacy-body",
    el("p", { text: `ε spent ${num(p.epsilon, 3)} of ${p.budget ?? "no budget"} at δ = ${p.delta}; ` +
      `${p.steps} noisy steps${p.budget_steps ? ` of ${p.budget_steps}` : ""}; σ = ${p.noise_multiplier}, ` +
      `clip ${p.max_grad_norm}, ${p.accountant} accountant${p.exhausted ? " — budget spent, training stopped" : ""}` }),
    meter);
  const spent = [{ name: "ε spent", colour: "#a86b00", points: ev.map((e) => [e.t, e.epsilon]) }];
  if (p.budget) spent.push({ name: "budget", colour: "#999", dashed: true, points: ev.map((e) => [e.t, p.budget]) });
  charts.epsilon.update(spent);
}

function peerState(p) {
  if (p.retry_in_s > 0) return ["backing off", `retry in ${duration(p.retry_in_s)}`];
  if (p.alive === false) return ["not answering", ""];
  return ["alive", ""];
}

function renderPeers(s, now) {
  const last = new Map();
  for (const x of state.exchanges) last.set(x.peer, x);
  const rows = s.peers.map((p) => {
    const [st, note] = peerState(p);
    const x = last.get(p.id);
    return el("tr", { "data-peer": p.id },
      el("td", { text: p.id }), el("td", { text: p.url }), el("td", { text: p.source }),
      el("td", { class: `state ${st.replace(" ", "-")}` }, st, note ? el("small", { text: ` ${note}` }) : null),
      el("td", { text: p.failures }), el("td", { text: ago(p.last_ok_s_ago) }),
      el("td", { text: x ? `${x.result} ${ago(now - x.t)}` : "–" }));
  });
  for (const ig of s.ignored_peers) {
    rows.push(el("tr", { "data-peer": ig.id || ig.url || "" },
      el("td", { text: ig.id || "?" }), el("td", { text: ig.url || "" }), el("td", { text: "" }),
      el("td", { class: "state ignored" }, "ignored", el("small", { text: ` ${ig.reason || ""}` })),
      el("td", { text: "" }), el("td", { text: "" }), el("td", { text: "" })));
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 7, class: "empty", text: "no peers known yet" })));
  document.querySelector("#peers tbody").replaceChildren(...rows);
}

function renderExchanges(now) {
  const rows = state.exchanges.slice(-25).reverse().map((x) =>
    el("tr", { class: `result-${x.result}` },
      el("td", { text: ago(now - x.t) }), el("td", { text: x.peer }), el("td", { text: x.role }),
      el("td", { text: x.result }), el("td", { text: duration(x.duration_s) }),
      el("td", { text: bytes(x.bytes_sent) }), el("td", { text: bytes(x.bytes_received) }),
      el("td", { text: x.distance === null ? "–" : x.distance.toExponential(2) }), el("td", { text: x.error || "" })));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 9, class: "empty", text: "no exchange yet" })));
  document.querySelector("#exchanges tbody").replaceChildren(...rows);
}

poll(tick, POLL_MS, onError);
