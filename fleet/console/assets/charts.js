// Charts drawn as SVG by hand: time series (one line per version or group), horizontal bars
// (PSI per feature against its thresholds) and a gate's value against its threshold. Each chart
// is an image with a title and a description that reads out its numbers, and lines differ by
// dash as well as by colour.

import { h, number } from "./ui.js";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#0b5cad", "#b3471b", "#2e7d32", "#6a3d9a", "#7a5c00", "#0e6f73"];
const DASHES = ["", "7 4", "2 3", "10 3 2 3", "4 4", "1 2"];

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) if (value !== undefined && value !== null) el.setAttribute(key, value);
  for (const child of children) if (child !== null && child !== undefined) el.append(child);
  return el;
}

// Round numbers for an axis from 0 to at least `max`.
function ticks(max, count = 4) {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((m) => m >= raw);
  const out = [];
  for (let v = 0; v <= max + step * 0.001; v += step) out.push(Number(v.toPrecision(6)));
  if (out[out.length - 1] < max) out.push(Number((out[out.length - 1] + step).toPrecision(6)));
  return out;
}

let serial = 0;

// series: [{name, points: [{at, value}]}]; format(value) labels the axis and description.
// minTop: the least the y axis shows, so a flat zero line reads as small, not as the top.
export function lineChart({ title, series, since, until, format = number, threshold = null, minTop = 1 }) {
  const width = 640;
  const height = 220;
  const m = { left: 58, right: 14, top: 12, bottom: 28 };
  const t0 = new Date(since).getTime();
  const t1 = new Date(until).getTime();
  const values = series.flatMap((x) => x.points.map((p) => p.value)).filter((v) => v !== null);
  const top = ticks(Math.max(...values, threshold ?? 0, minTop));
  const yMax = top[top.length - 1] || 1;
  const x = (at) => m.left + ((new Date(at).getTime() - t0) / Math.max(t1 - t0, 1)) * (width - m.left - m.right);
  const y = (v) => height - m.bottom - (v / yMax) * (height - m.top - m.bottom);
  const id = `chart-${(serial += 1)}`;

  const grid = top.map((v) =>
    s(
      "g",
      {},
      s("line", { x1: m.left, x2: width - m.right, y1: y(v), y2: y(v), class: "grid" }),
      s("text", { x: m.left - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, format(v)),
    ),
  );
  const times = [t0, (t0 + t1) / 2, t1].map((t) =>
    s(
      "text",
      { x: x(t), y: height - 8, class: "tick", "text-anchor": t === t0 ? "start" : t === t1 ? "end" : "middle" },
      new Date(t).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" }),
    ),
  );
  const lines = series.map((one, i) => {
    const color = PALETTE[i % PALETTE.length];
    let d = "";
    let pen = false;
    const dots = [];
    one.points.forEach((p, k) => {
      if (p.value === null) {
        pen = false;
        return;
      }
      d += `${pen ? "L" : "M"}${x(p.at).toFixed(1)},${y(p.value).toFixed(1)}`;
      const prev = one.points[k - 1];
      const next = one.points[k + 1];
      if ((!prev || prev.value === null) && (!next || next.value === null)) {
        dots.push(s("circle", { cx: x(p.at), cy: y(p.value), r: 3, fill: color }));
      }
      pen = true;
    });
    return s(
      "g",
      { class: "series", "data-series": one.name },
      s("path", { d, stroke: color, "stroke-dasharray": DASHES[i % DASHES.length] || null, fill: "none", "stroke-width": 2 }),
      ...dots,
    );
  });
  const limit =
    threshold === null
      ? null
      : s("line", { x1: m.left, x2: width - m.right, y1: y(threshold), y2: y(threshold), class: "threshold" });
  const latest = series.map((one) => {
    const last = [...one.points].reverse().find((p) => p.value !== null);
    return `${one.name}: ${last ? format(last.value) : "no data"}`;
  });
  const svg = s(
    "svg",
    { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": `${id}-t ${id}-d`, class: "chart" },
    s("title", { id: `${id}-t` }, title),
    s("desc", { id: `${id}-d` }, `Latest values. ${latest.join("; ")}.${threshold === null ? "" : ` Threshold ${format(threshold)}.`}`),
    ...grid,
    ...times,
    limit,
    ...lines,
  );
  return h("figure", { class: "chart-box" }, h("figcaption", {}, title), svg, legend(series.map((x) => x.name)));
}

function legend(names) {
  return h(
    "ul",
    { class: "legend" },
    names.map((name, i) => {
      const swatch = s(
        "svg",
        { width: 28, height: 10, "aria-hidden": "true" },
        s("line", { x1: 0, x2: 28, y1: 5, y2: 5, stroke: PALETTE[i % PALETTE.length], "stroke-width": 3, "stroke-dasharray": DASHES[i % DASHES.length] || null }),
      );
      return h("li", {}, swatch, name);
    }),
  );
}

// Horizontal bars, e.g. PSI per feature, with warn and alert thresholds drawn across.
export function barChart({ title, bars, warn = null, alert = null, format = number }) {
  const width = 640;
  const row = 22;
  const m = { left: 130, right: 60, top: 8, bottom: 8 };
  const height = m.top + m.bottom + row * Math.max(bars.length, 1);
  const max = Math.max(...bars.map((b) => b.value ?? 0), alert ?? 0, warn ?? 0, 1e-9) * 1.1;
  const x = (v) => m.left + (v / max) * (width - m.left - m.right);
  const id = `chart-${(serial += 1)}`;
  const rows = bars.map((b, i) => {
    const yTop = m.top + i * row;
    const level = alert !== null && b.value >= alert ? "alert" : warn !== null && b.value >= warn ? "warn" : "ok";
    return s(
      "g",
      { class: `bar ${level}` },
      s("text", { x: m.left - 6, y: yTop + 15, class: "tick", "text-anchor": "end" }, b.name),
      s("rect", { x: m.left, y: yTop + 4, width: Math.max(x(b.value ?? 0) - m.left, 1), height: row - 8 }),
      s("text", { x: x(b.value ?? 0) + 4, y: yTop + 15, class: "tick" }, b.value === null ? "n/a" : format(b.value)),
    );
  });
  const marks = [
    [warn, "warn"],
    [alert, "alert"],
  ]
    .filter(([v]) => v !== null)
    .map(([v, kind]) => s("line", { x1: x(v), x2: x(v), y1: m.top, y2: height - m.bottom, class: `threshold ${kind}` }));
  const described = bars.map((b) => `${b.name} ${b.value === null ? "n/a" : format(b.value)}`).join("; ");
  return h(
    "figure",
    { class: "chart-box" },
    h("figcaption", {}, title),
    s(
      "svg",
      { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": `${id}-t ${id}-d`, class: "chart" },
      s("title", { id: `${id}-t` }, title),
      s("desc", { id: `${id}-d` }, `${described}. Warn at ${format(warn)}, alert at ${format(alert)}.`),
      ...rows,
      ...marks,
    ),
  );
}

// A gate's value against its threshold: a bar that is green under the threshold, red over.
export function gateMeter(value, threshold, passed) {
  const width = 120;
  const max = Math.max(value ?? 0, threshold, 1e-9) * 1.25;
  const x = (v) => (v / max) * width;
  return s(
    "svg",
    { width, height: 14, viewBox: `0 0 ${width} 14`, class: `meter ${passed === false ? "over" : passed ? "under" : "unjudged"}`, "aria-hidden": "true" },
    s("rect", { x: 0, y: 3, width, height: 8, class: "track" }),
    s("rect", { x: 0, y: 3, width: value === null ? 0 : Math.max(x(value), 1), height: 8, class: "value" }),
    s("line", { x1: x(threshold), x2: x(threshold), y1: 0, y2: 14, class: "limit" }),
  );
}
