// A small line chart drawn as plain SVG: time on x (wall clock), one path per series, a legend.
// No library: the dashboards need lines and axes only, and the page must work offline with a strict
// Content-Security-Policy. Each path carries data-series, data-n (its number of points) and data-last
// (its last point, as JSON [t, y]) so that a test, or a curious user, can read what is drawn.

import { el, svg } from "./common.js";

const W = 640;
const H = 240;
const PAD = { left: 58, right: 12, top: 10, bottom: 28 };

function ticks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const step0 = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9 && out.length <= 2 * n + 2; v += step) out.push(v);
  return out;
}

/** [min, max] of ``f(point[at])`` over every point of ``series``, by a loop: Math.min(...values) passes each
 * value as an argument, and above about 125,000 of them the call stack overflows. */
function extent(series, at, f = (v) => v) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const s of series) for (const p of s.points) {
    const v = f(p[at]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  return [lo, hi];
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.toTimeString().slice(0, 8);
}

function label(v, log, step) {
  if (log) return v.toExponential(0);
  const a = Math.abs(v);
  if (a >= 1e6) return `${(v / 1e6).toFixed(step >= 1e6 ? 0 : 1)}M`;
  if (a >= 1e4) return `${(v / 1e3).toFixed(step >= 1e3 ? 0 : 1)}k`;
  const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step || 1))));
  return v.toFixed(decimals);
}

export class LineChart {
  /**
   * @param {Element} host  where the chart goes (its content is replaced on every update)
   * @param {object} opts   yLabel, log (log-scale y), yMin / yMax (fixed bounds), empty (text when no data)
   */
  constructor(host, opts = {}) {
    this.host = host;
    this.opts = opts;
  }

  /** Draw ``series``: [{name, colour, points: [[t, y], ...], width?, dashed?}] (null y values skipped). */
  update(series) {
    const { log = false } = this.opts;
    const ok = (y) => y !== null && y !== undefined && Number.isFinite(y) && (!log || y > 0);
    const clean = series.map((s) => ({ ...s, points: s.points.filter(([t, y]) => Number.isFinite(t) && ok(y)) }));
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": this.opts.yLabel });
    if (clean.every((s) => s.points.length === 0)) {
      root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty", text: this.opts.empty || "no data yet" }));
      this.host.replaceChildren(root);
      return;
    }
    const f = log ? Math.log10 : (y) => y;
    let [t0, t1] = extent(clean, 0);
    if (t1 - t0 < 1) t1 = t0 + 1;
    const [lowest, highest] = extent(clean, 1, f);
    let y0 = this.opts.yMin ?? lowest;
    let y1 = this.opts.yMax ?? highest;
    if (this.opts.yMin !== undefined && log) y0 = f(this.opts.yMin);
    if (this.opts.yMax !== undefined && log) y1 = f(this.opts.yMax);
    if (y1 - y0 < 1e-12) {
      const pad = Math.abs(y1) * 0.05 || 0.5;
      y0 -= pad;
      y1 += pad;
    }
    if (log) {
      y0 = Math.floor(y0);
      y1 = Math.ceil(y1);
      if (y1 === y0) y1 += 1;
    }
    const x = (t) => PAD.left + ((t - t0) / (t1 - t0)) * (W - PAD.left - PAD.right);
    const y = (v) => H - PAD.bottom - ((f(v) - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);

    const grid = svg("g", { class: "grid" });
    const yTicks = log ? Array.from({ length: y1 - y0 + 1 }, (_, i) => 10 ** (y0 + i)) : ticks(y0, y1, 4);
    const step = yTicks.length > 1 ? yTicks[1] - yTicks[0] : Math.abs(yTicks[0]) || 1;
    for (const v of yTicks) {
      const yy = y(v);
      grid.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: yy, y2: yy }));
      grid.append(svg("text", { x: PAD.left - 6, y: yy + 4, "text-anchor": "end", text: label(v, log, step) }));
    }
    for (const t of ticks(t0, t1, 5)) {
      grid.append(svg("text", { x: x(t), y: H - 8, "text-anchor": "middle", text: clock(t) }));
    }
    root.append(grid);
    if (this.opts.yLabel) {
      root.append(svg("text", { x: 12, y: PAD.top + (H - PAD.top - PAD.bottom) / 2, class: "axis-label",
        transform: `rotate(-90 12 ${PAD.top + (H - PAD.top - PAD.bottom) / 2})`, "text-anchor": "middle", text: this.opts.yLabel }));
    }
    for (const s of clean) {
      if (s.points.length === 0) continue;
      const d = s.points.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join("");
      const last = s.points[s.points.length - 1];
      const path = svg("path", {
        d,
        class: s.dashed ? "series dashed" : "series",
        stroke: s.colour,
        "stroke-width": s.width || 1.5,
        "data-series": s.name,
        "data-n": s.points.length,
        "data-last": JSON.stringify(last),
      });
      path.append(svg("title", { text: s.name }));
      root.append(path);
      if (s.points.length === 1 || s.dots) {
        for (const [t, v] of s.points) root.append(svg("circle", { cx: x(t), cy: y(v), r: 2.5, fill: s.colour }));
      }
    }
    const named = clean.filter((s) => s.points.length > 0 && s.legend !== false);
    const legend = named.length > 1
      ? el("div", { class: "legend" }, named.map((s) => el("span", { class: "key" },
          el("span", { class: "swatch", "data-colour": s.colour }), s.name)))
      : null;
    this.host.replaceChildren(root, ...(legend ? [legend] : []));
    if (legend) for (const sw of legend.querySelectorAll(".swatch")) sw.style.background = sw.dataset.colour;
  }
}
