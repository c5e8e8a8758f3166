// The telemetry charts: p95 latency, error rate, fallback rate and worst-feature PSI of one
// model over time, one line per version (in one group or the whole fleet) or one line per
// group (for one version). Every line is one call to GET /telemetry/series.

import { api, query } from "../api.js";
import { lineChart } from "../charts.js";
import { h, field, number, percent, patch, section, select } from "../ui.js";

// [metric, title, format, least top of the y axis]
const METRICS = [
  ["latency_p95_ms", "p95 latency (ms)", (v) => `${number(v)} ms`, 1],
  ["error_rate", "Error rate", (v) => percent(v), 0.05],
  ["fallback_rate", "Fallback rate", (v) => percent(v), 0.05],
  ["psi", "Drift: worst PSI", (v) => number(v, 2), 0.3],
];
const RANGES = [
  ["900", "Last 15 minutes", 15],
  ["3600", "Last hour", 60],
  ["21600", "Last 6 hours", 300],
  ["86400", "Last 24 hours", 900],
];

// The versions worth a line: what devices run (or shadow) now, and what rollouts moved lately.
function liveVersions(model, devices, rollouts, since) {
  const seen = new Set();
  for (const device of devices)
    for (const m of device.models) {
      if (m.name !== model) continue;
      if (m.version) seen.add(m.version);
      if (m.shadow) seen.add(m.shadow);
    }
  for (const r of rollouts) if (r.model === model && new Date(r.updated_at) >= since) seen.add(r.version);
  return [...seen].sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
}

export function telemetryCharts(view, { models, groups, model: initial }) {
  if (!models.length) return section("Telemetry", h("p", { class: "empty" }, "No model is published yet."));
  const state = {
    model: initial ?? models[0].name,
    by: "version",
    group: "",
    version: "",
    range: "900",
  };
  const region = h("div", { class: "charts", id: "charts" });
  const controls = h("div", { class: "filters" });
  const redraw = () => refresh().catch((error) => region.replaceChildren(h("p", { class: "error" }, error.message)));

  const control = (label, name, options) => {
    const box = select(name, options, state[name]);
    box.addEventListener("change", () => {
      state[name] = box.value;
      if (name === "model") state.version = ""; // versions are per model
      drawControls();
      redraw();
    });
    return field(label, box);
  };
  let versions = [];
  // Whether each version has a drift profile (PSI needs one); asked once per version.
  const drift = new Map();
  const profiled = async (version) => {
    if (!version || drift.has(`${state.model}@${version}`)) return;
    const v = await api(`/models/${encodeURIComponent(state.model)}/versions/${encodeURIComponent(version)}`);
    drift.set(`${state.model}@${version}`, v.drift !== null);
  };
  function drawControls() {
    const parts = [
      control("Model", "model", models.map((m) => [m.name, m.name])),
      control("Lines per", "by", [
        ["version", "version"],
        ["group", "group"],
      ]),
    ];
    if (state.by === "version")
      parts.push(control("Devices", "group", [["", "whole fleet"], ...groups.map((g) => [g.name, `group ${g.name}`])]));
    else parts.push(control("Version", "version", [["", "latest running"], ...versions.map((v) => [v, v])]));
    parts.push(control("Range", "range", RANGES.map(([v, text]) => [v, text])));
    const focused = document.activeElement?.name;
    controls.replaceChildren(...parts);
    if (focused) controls.querySelector(`[name="${focused}"]`)?.focus();
  }

  async function refresh() {
    const span = Number(state.range);
    const step = RANGES.find(([v]) => v === state.range)[2];
    const until = new Date();
    const since = new Date(until.getTime() - span * 1000);
    const [devices, rollouts] = await Promise.all([api("/devices"), api("/rollouts")]);
    const found = liveVersions(state.model, devices, rollouts, since);
    if (found.join() !== versions.join()) {
      versions = found;
      if (state.by === "group") drawControls();
    }
    let lines;
    if (state.by === "version") {
      lines = versions.map((v) => ({ name: v, version: v, group: state.group }));
    } else {
      const version = state.version || versions[versions.length - 1];
      lines = groups.map((g) => ({ name: `group ${g.name}`, version, group: g.name }));
    }
    await Promise.all(lines.map((line) => profiled(line.version)));
    const charts = await Promise.all(
      METRICS.map(async ([metric, title, format, minTop]) => {
        const series = await Promise.all(
          lines.map(async (line) => {
            if (metric === "psi" && !drift.get(`${state.model}@${line.version}`)) return { name: `${line.name} (no drift profile)`, points: [] };
            const params = { model: state.model, metric, version: line.version, group: line.group, since: since.toISOString(), until: until.toISOString(), step };
            try {
              const answer = await api(`/telemetry/series${query(params)}`);
              return { name: line.name, points: answer.points };
            } catch (error) {
              // A refused series (e.g. a version without data there) says so in the legend.
              return { name: `${line.name} (${error.reason === "invalid_query" || error.status === 409 ? "no data" : error.message})`, points: [] };
            }
          }),
        );
        return { metric, title, format, minTop, series };
      }),
    );
    patch(region, { charts, since: since.toISOString().slice(0, 16) }, () =>
      h(
        "div",
        { class: "charts" },
        lines.length
          ? charts.map((c) =>
              lineChart({ title: `${c.title}, ${state.model}`, series: c.series, since, until, format: c.format, minTop: c.minTop }),
            )
          : h("p", { class: "empty" }, `No device reports ${state.model} yet.`),
      ),
    );
  }

  drawControls();
  view.every(10000, refresh);
  return section("Telemetry", controls, region);
}
