// Models and their versions: every published version, and one version in full — its manifest,
// the parity report of its export, its drift profile and its live drift across the fleet.

import { api, query, session } from "../api.js";
import { barChart } from "../charts.js";
import { badge, bytes, dateTime, facts, field, h, link, number, patch, percent, section, select, short, table, when } from "../ui.js";
import { telemetryCharts } from "./telemetry.js";

const versionHref = (v) => `#/models/${encodeURIComponent(v.name)}/${encodeURIComponent(v.version)}`;

export async function list(view) {
  view.main.append(h("h1", { tabindex: "-1" }, "Models"));
  const region = h("div", { id: "models" });
  view.main.append(region);
  await view.every(5000, async () => {
    const models = await api("/models");
    const details = await Promise.all(models.map((m) => api(`/models/${encodeURIComponent(m.name)}`)));
    patch(region, details, () =>
      details.length
        ? details.map((m) =>
            section(
              m.name,
              table({
                caption: `${m.versions.length} published version${m.versions.length === 1 ? "" : "s"}, newest first`,
                rows: [...m.versions].reverse(),
                columns: [
                  { label: "Version", cell: (v) => link(versionHref(v), v.version) },
                  { label: "Runtime", cell: (v) => v.runtime },
                  { label: "Quantization", cell: (v) => v.quantization },
                  { label: "Size", numeric: true, cell: (v) => bytes(v.length) },
                  { label: "sha256", cell: (v) => h("code", { title: v.sha256 }, short(v.sha256)) },
                  { label: "Published", cell: (v) => [when(v.published_at), h("span", { class: "muted" }, ` by ${v.published_by}`)] },
                ],
              }),
            ),
          )
        : h("p", { class: "empty" }, "No model is published yet: `edgefleet fleet publish BUNDLE.efb`."),
    );
  });
}

function tensors(caption, specs) {
  return table({
    caption,
    rows: specs,
    columns: [
      { label: "Name", cell: (t) => h("code", {}, t.name) },
      { label: "Type", cell: (t) => t.datatype },
      { label: "Shape", cell: (t) => `[${t.shape.join(", ")}]` },
    ],
  });
}

function parity(report) {
  if (!report) return h("p", { class: "muted" }, "No parity report: the version was not checked against a source model.");
  return facts([
    ["Samples", number(report.samples)],
    ["Top-1 agreement", percent(report.top1_agreement, 2)],
    ["Source accuracy", percent(report.source_accuracy, 2)],
    ["Exported accuracy", percent(report.exported_accuracy, 2)],
    ["Max |difference|", number(report.max_abs_diff)],
    ["Mean |difference|", number(report.mean_abs_diff)],
  ]);
}

function profile(drift) {
  if (!drift) return h("p", { class: "muted" }, "No drift profile: live drift cannot be measured for this version.");
  return facts([
    ["Features", drift.features.length],
    ["Outputs", drift.outputs.map((o) => o.name).join(", ") || "—"],
    ["PSI warn at", number(drift.psi_warn)],
    ["PSI alert at", number(drift.psi_alert)],
  ]);
}

function liveDrift(name, version, detail, versions, groups) {
  const state = { group: "", against: "reference" };
  const region = h("div", { id: "live-drift" });
  const draw = async () => {
    const report = await api(
      `/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}/drift${query({ group: state.group, against: state.against })}`,
    );
    const all = [...report.outputs, ...report.features];
    const worst = [...all].sort((a, b) => (b.psi ?? -1) - (a.psi ?? -1)).slice(0, 12);
    patch(region, [report.scope, report.against, report.rows, report.devices, all.map((f) => [f.name, f.psi])], () =>
      h(
        "div",
        {},
        h("p", {}, `${number(report.rows)} rows from ${report.devices} device${report.devices === 1 ? "" : "s"} (${report.scope}), ${dateTime(report.since)} to ${dateTime(report.until)}, against ${report.against}.`),
        report.rows
          ? barChart({
              title: `Worst ${worst.length} of ${all.length} features and outputs by PSI`,
              bars: worst.map((f) => ({ name: f.name, value: f.psi })),
              warn: report.psi_warn,
              alert: report.psi_alert,
            })
          : h("p", { class: "empty" }, "No drift counts in this window yet."),
      ),
    );
  };
  const control = (label, key, options) => {
    const box = select(key, options, state[key]);
    box.addEventListener("change", () => {
      state[key] = box.value;
      draw().catch((e) => region.replaceChildren(h("p", { class: "error" }, e.message)));
    });
    return field(label, box);
  };
  const controls = h(
    "div",
    { class: "filters" },
    control("Devices", "group", [["", "whole fleet"], ...groups.map((g) => [g.name, `group ${g.name}`])]),
    control("Against", "against", [["reference", "its reference profile"], ...versions.filter((v) => v !== version).map((v) => [v, `version ${v} (live)`])]),
  );
  return { node: section("Live drift", controls, region), draw };
}

export async function version(view) {
  const [name, ver] = view.params;
  const [v, model, groups, models] = await Promise.all([
    api(`/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(ver)}`),
    api(`/models/${encodeURIComponent(name)}`),
    api("/groups"),
    api("/models"),
  ]);
  const m = v.manifest;
  view.main.append(
    h("p", { class: "crumbs" }, link("#/models", "Models"), " / ", name, " / ", ver),
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, `${name} ${ver}`), session.can("operator") ? link(`#/rollouts/new${query({ model: name, version: ver })}`, "Roll this version out…") : null),
    h(
      "div",
      { class: "columns" },
      section(
        "Manifest",
        facts([
          ["Runtime", m.runtime],
          ["Quantization", badge("plain", v.quantization)],
          ["Model file", h("code", {}, m.model_file)],
          ["Preferred devices", m.preferred_devices.join(", ")],
          ["Batching", m.batchable ? `up to ${m.max_batch_size} rows` : "one request at a time"],
          ["Fallback", v.fallback ?? "none"],
          ["Size", bytes(v.length)],
          ["sha256", h("code", {}, v.sha256)],
          ["Release", v.release],
          ["Published", `${dateTime(v.published_at)} by ${v.published_by}`],
          ["Built", `${dateTime(m.created)} by ${m.producer}`],
        ]),
      ),
      section("Parity report", parity(v.parity), h("h3", {}, "Drift profile"), profile(v.drift)),
    ),
    h("div", { class: "columns" }, section("Inputs", tensors("Inputs the model takes", m.inputs)), section("Outputs", tensors("Outputs it returns", m.outputs))),
  );
  if (v.drift) {
    const drift = liveDrift(name, ver, v, model.versions.map((x) => x.version), groups);
    view.main.append(drift.node);
    view.every(10000, drift.draw);
  }
  view.main.append(telemetryCharts(view, { models, groups, model: name }));
}
