// Devices: the list with its filters (group, tag, health, id), and one device in full: what it
// runs and where, its labels (operators edit them), its recent updates and its telemetry stream.

import { api, query, session } from "../api.js";
import { badge, facts, field, h, link, patch, say, section, select, table, when } from "../ui.js";

const HEALTH = ["healthy", "degraded", "unknown", "lost", "offline", "never_seen"];

function chips(words) {
  return words.length ? words.map((w) => h("span", { class: "chip" }, w)) : h("span", { class: "muted" }, "—");
}

function running(device) {
  if (!device.models.length) return h("span", { class: "muted" }, "nothing reported");
  return device.models.map((m) =>
    h(
      "div",
      { class: "model-line" },
      h("strong", {}, m.name), " ", m.version ?? "—",
      m.error ? [" ", badge("failed", "not loaded")] : null,
      m.shadow ? h("span", { class: "muted" }, ` · shadow ${m.shadow}`) : null,
    ),
  );
}

function actualDevice(device) {
  const where = device.models.filter((m) => m.device).map((m) => `${m.device}${m.runtime ? ` (${m.runtime})` : ""}`);
  return where.length ? [...new Set(where)].join(", ") : "—";
}

export async function list(view) {
  const q = view.query;
  const [groups, tags] = await Promise.all([api("/groups"), api("/tags")]);
  const filters = { group: q.get("group") ?? "", tag: q.get("tag") ?? "", health: q.get("health") ?? "", text: q.get("q") ?? "" };
  const apply = () => view.go(`#/devices${query({ group: filters.group, tag: filters.tag, health: filters.health, q: filters.text })}`);
  const control = (label, name, options) => {
    const box = select(name, options, filters[name]);
    box.addEventListener("change", () => {
      filters[name] = box.value;
      apply();
    });
    return field(label, box);
  };
  const search = h("input", { type: "search", name: "q", value: filters.text, placeholder: "cam-00" });
  search.addEventListener("change", () => {
    filters.text = search.value.trim();
    apply();
  });
  const region = h("div", { id: "device-list" });
  view.main.append(
    h("h1", { tabindex: "-1" }, "Devices"),
    h(
      "form",
      { class: "filters panel", role: "search", "aria-label": "Filter devices", onsubmit: (e) => e.preventDefault() },
      control("Group", "group", [["", "any group"], ...groups.map((g) => [g.name, `${g.name} (${g.devices})`])]),
      control("Tag", "tag", [["", "any tag"], ...tags.map((t) => [t.name, `${t.name} (${t.devices})`])]),
      control("Health", "health", [["", "any health"], ...HEALTH.map((x) => [x, x.replace("_", " ")])]),
      field("Device id contains", search),
    ),
    region,
  );
  await view.every(3000, async () => {
    const found = await api(`/devices${query({ group: filters.group, tag: filters.tag, health: filters.health })}`);
    const shown = found.filter((d) => d.id.includes(filters.text));
    patch(region, shown, () =>
      table({
        id: "devices",
        caption: `${shown.length} device${shown.length === 1 ? "" : "s"}`,
        empty: "No device matches these filters.",
        rows: shown,
        columns: [
          { label: "Device", cell: (d) => link(`#/devices/${encodeURIComponent(d.id)}`, d.id) },
          { label: "Health", cell: (d) => badge(d.health) },
          { label: "Runs", cell: running },
          { label: "On", cell: actualDevice },
          { label: "Last seen", cell: (d) => when(d.last_seen) },
          { label: "Groups", cell: (d) => chips(d.groups) },
          { label: "Tags", cell: (d) => chips(d.tags) },
        ],
      }),
    );
  });
}

function labelEditor(device, onChange) {
  const kind = select("kind", [["group", "group"], ["tag", "tag"]], "group");
  const name = h("input", { name: "label", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._:=\\-]{0,63}" });
  const change = async (body) => {
    try {
      await api(`/devices/${encodeURIComponent(device.id)}/labels`, { method: "PATCH", body });
      say("Labels saved (and recorded in the audit log).");
      onChange();
    } catch (error) {
      say(error.message, "error");
    }
  };
  const removable = [
    ...device.groups.map((g) => ["group", g]),
    ...device.tags.map((t) => ["tag", t]),
  ];
  return h(
    "div",
    {},
    h(
      "div",
      { class: "actions" },
      removable.map(([k, v]) =>
        h("button", { type: "button", class: "secondary", "aria-label": `Remove ${k} ${v}`, onclick: () => change({ [`remove_${k}s`]: [v] }) }, `${k} ${v} ✕`),
      ),
    ),
    h(
      "form",
      {
        class: "filters",
        "aria-label": "Add a label",
        onsubmit: (e) => {
          e.preventDefault();
          change({ [`add_${kind.value}s`]: [name.value.trim()] });
        },
      },
      field("Add a", kind),
      field("named", name),
      h("div", { class: "field" }, h("button", { type: "submit", class: "primary" }, "Add label")),
    ),
  );
}

export async function detail(view) {
  const [id] = view.params;
  const head = h("div", {});
  const labels = h("div", {});
  const updates = h("div", {});
  const stream = h("div", {});
  view.main.append(
    h("p", { class: "crumbs" }, link("#/devices", "Devices"), " / ", id),
    h("h1", { tabindex: "-1" }, `Device ${id}`),
    head,
    h("div", { class: "columns" }, section("Labels", labels), section("Telemetry stream", stream)),
    section("Recent updates", updates),
  );
  let last = null;
  const refresh = async () => {
    const [device, telemetry] = await Promise.all([
      api(`/devices/${encodeURIComponent(id)}`),
      api(`/devices/${encodeURIComponent(id)}/telemetry?limit=20`),
    ]);
    last = device;
    patch(head, device, (d) =>
      h(
        "div",
        { class: "columns" },
        section(
          "State",
          facts([
            ["Health", badge(d.health)],
            ["Connection", d.connection],
            ["Last seen", when(d.last_seen)],
            ["Enrolled", when(d.enrolled_at)],
            ["Agent", d.agent_version],
            ["Trust", d.trust_status ? badge(d.trust_status) : "—"],
            ["Desired state", `#${d.desired_seq}`],
          ]),
        ),
        section(
          "Models",
          table({
            caption: "What it serves now, and where",
            rows: d.models,
            empty: "It has not reported a model yet.",
            columns: [
              { label: "Model", cell: (m) => (m.version ? link(`#/models/${encodeURIComponent(m.name)}/${encodeURIComponent(m.version)}`, `${m.name} ${m.version}`) : m.name) },
              { label: "Runs on", cell: (m) => m.device ?? "—" },
              { label: "Runtime", cell: (m) => m.runtime ?? "—" },
              { label: "Fallback", cell: (m) => m.fallback ?? "—" },
              { label: "Shadow", cell: (m) => m.shadow ?? "—" },
              { label: "Problem", cell: (m) => m.error ?? "—" },
            ],
          }),
          Object.keys(d.hardware).length ? h("h3", {}, "Hardware") : null,
          Object.keys(d.hardware).length ? facts(Object.entries(d.hardware).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : String(v)])) : null,
        ),
      ),
    );
    patch(labels, [device.groups, device.tags, session.me.role], () =>
      h(
        "div",
        {},
        facts([
          ["Groups", chips(device.groups)],
          ["Tags", chips(device.tags)],
        ]),
        session.can("operator") ? labelEditor(device, refresh) : h("p", { class: "muted" }, "Operators can change labels."),
      ),
    );
    patch(stream, telemetry, (t) =>
      h(
        "div",
        {},
        facts([
          ["Highest seq", t.high_seq],
          ["Received", t.received],
          ["Duplicates", t.duplicates],
          ["Dropped by the device", t.dropped],
          ["Missing", t.missing],
          ["Last record", when(t.last_at)],
        ]),
        table({
          caption: `Gaps (${t.gap_ranges})`,
          empty: "No gaps: every record arrived.",
          rows: t.gaps,
          columns: [
            { label: "Seqs", cell: (g) => `${g.first_seq}–${g.last_seq}` },
            { label: "Size", numeric: true, cell: (g) => g.size },
            { label: "Cause", cell: (g) => badge(g.cause === "dropped" ? "failed" : "unknown", g.cause) },
            { label: "Noticed", cell: (g) => when(g.noticed_at) },
          ],
        }),
      ),
    );
    patch(updates, device.updates, (rows) =>
      table({
        caption: "Update messages the device sent, newest first",
        empty: "No updates yet.",
        rows,
        columns: [
          { label: "When", cell: (u) => when(u.at) },
          { label: "Stage", cell: (u) => badge(u.stage) },
          { label: "Rollout", cell: (u) => (u.rollout_id ? link(`#/rollouts/${u.rollout_id}`, u.rollout_id) : "—") },
          { label: "Seq", numeric: true, cell: (u) => u.seq ?? "—" },
          { label: "Reason", cell: (u) => [u.reason ?? "", u.detail ? h("div", { class: "muted" }, u.detail) : null] },
        ],
      }),
    );
  };
  await view.every(3000, refresh);
  return last;
}
