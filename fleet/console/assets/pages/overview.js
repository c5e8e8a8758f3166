// The overview: device health at a glance, the rollouts in progress, open drift alerts, and
// the telemetry charts.

import { api } from "../api.js";
import { badge, h, link, number, patch, section, table, when } from "../ui.js";
import { rolloutProgress } from "./rollouts.js";
import { telemetryCharts } from "./telemetry.js";

const ACTIVE = ["created", "running", "awaiting_approval", "paused"];

function card(value, label, href) {
  return h("a", { class: "card", href }, h("span", { class: "value" }, value), h("span", { class: "label" }, label));
}

export async function render(view) {
  const cards = h("div", { class: "cards", id: "cards" });
  const active = h("div", { id: "active-rollouts" });
  const alerts = h("div", { id: "open-alerts" });
  const [models, groups] = await Promise.all([api("/models"), api("/groups")]);
  view.main.append(
    h("h1", { tabindex: "-1" }, "Fleet overview"),
    cards,
    h("div", { class: "columns" }, section("Rollouts in progress", active), section("Open drift alerts", alerts)),
    telemetryCharts(view, { models, groups }),
  );
  await view.every(3000, async () => {
    const [devices, rollouts, open] = await Promise.all([api("/devices"), api("/rollouts"), api("/alerts")]);
    const health = (name) => devices.filter((d) => d.health === name).length;
    const running = rollouts.filter((r) => ACTIVE.includes(r.state));
    patch(cards, [devices.length, health("healthy"), health("degraded"), running.length, open.length, models.length], () => [
      card(devices.length, "devices", "#/devices"),
      card(health("healthy"), "healthy", "#/devices?health=healthy"),
      card(devices.length - health("healthy"), "not healthy", "#/devices"),
      card(running.length, "rollouts in progress", "#/rollouts"),
      card(open.length, "open drift alerts", "#/"),
      card(models.length, "models", "#/models"),
    ]);
    patch(active, running, () =>
      table({
        caption: "Rollouts that still own their devices",
        empty: "No rollout is in progress. Start one under Rollouts.",
        rows: running,
        columns: [
          { label: "Rollout", cell: (r) => link(`#/rollouts/${r.id}`, `${r.model} ${r.version}`) },
          { label: "State", cell: (r) => badge(r.state) },
          { label: "Progress", cell: (r) => rolloutProgress(r) },
          { label: "Updated", cell: (r) => when(r.updated_at) },
        ],
      }),
    );
    patch(alerts, open, () =>
      table({
        caption: "Features or outputs whose PSI crossed their profile's threshold",
        empty: "No open drift alerts.",
        rows: open,
        columns: [
          { label: "Level", cell: (a) => badge(a.level) },
          { label: "Version", cell: (a) => link(`#/models/${encodeURIComponent(a.model)}/${encodeURIComponent(a.version)}`, `${a.model} ${a.version}`) },
          { label: "Scope", cell: (a) => a.scope },
          { label: "Feature", cell: (a) => h("code", {}, a.feature) },
          { label: "PSI", numeric: true, cell: (a) => `${number(a.psi, 3)} ≥ ${number(a.threshold)}` },
          { label: "Raised", cell: (a) => when(a.raised_at) },
        ],
      }),
    );
  });
}
