// The audit log: every change, who made it and when, newest first; filter by actor or subject,
// page back with "Older entries".

import { api, query } from "../api.js";
import { dateTime, field, h, link, patch, table } from "../ui.js";

const PAGE = 50;

function subjectLink(entry) {
  if (entry.action.startsWith("rollout.")) return link(`#/rollouts/${entry.subject}`, entry.subject);
  if (entry.action.startsWith("device.")) return link(`#/devices/${encodeURIComponent(entry.subject)}`, entry.subject);
  if (entry.action.startsWith("model.") || entry.action.startsWith("drift.")) {
    const [name, version] = entry.subject.split("@");
    if (version) return link(`#/models/${encodeURIComponent(name)}/${encodeURIComponent(version)}`, entry.subject);
  }
  return h("code", {}, entry.subject);
}

function auditTable(entries, caption) {
  return table({
    id: "audit",
    caption,
    empty: "No entries.",
    rows: entries,
    columns: [
      { label: "When", cell: (e) => h("time", { datetime: e.at }, dateTime(e.at)) },
      { label: "Who", cell: (e) => e.actor },
      { label: "Did", cell: (e) => h("code", {}, e.action) },
      { label: "To", cell: subjectLink },
      { label: "Detail", cell: (e) => (e.detail ? h("code", { class: "muted" }, JSON.stringify(e.detail)) : "") },
    ],
  });
}

export async function render(view) {
  const filters = { actor: view.query.get("actor") ?? "", subject: view.query.get("subject") ?? "" };
  const actor = h("input", { name: "actor", value: filters.actor });
  const subject = h("input", { name: "subject", value: filters.subject });
  const region = h("div", { id: "audit-log" });
  const older = h("div", {});
  let pages = 1;
  const form = h(
    "form",
    {
      class: "filters panel",
      role: "search",
      "aria-label": "Filter the audit log",
      onsubmit: (e) => {
        e.preventDefault();
        view.go(`#/audit${query({ actor: actor.value.trim(), subject: subject.value.trim() })}`);
      },
    },
    field("Actor (token name)", actor),
    field("Subject (rollout, device, model@version…)", subject),
    h("div", { class: "field" }, h("button", { type: "submit", class: "primary" }, "Filter")),
  );
  view.main.append(h("h1", { tabindex: "-1" }, "Audit log"), form, region, older);
  const refresh = async () => {
    const entries = await api(`/audit${query({ ...filters, limit: Math.min(PAGE * pages, 1000) })}`);
    patch(region, entries, () => auditTable(entries, "Every change, newest first"));
    patch(older, [entries.length >= PAGE * pages && PAGE * pages < 1000], ([more]) =>
      more
        ? h("button", { type: "button", class: "secondary", onclick: () => { pages += 1; refresh(); } }, "Older entries")
        : h("span", {}),
    );
  };
  await view.every(5000, refresh);
}
