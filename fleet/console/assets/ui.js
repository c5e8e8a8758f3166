// Small DOM helpers shared by every page: element building, tables, badges, formatting,
// confirmation dialogs, and `patch`, which redraws a region only when its data changed (so a
// poll never steals keyboard focus from a button whose data stayed the same).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

const drawn = new WeakMap();

// Redraw `region` with render(data) only when `data` differs from what it shows.
export function patch(region, data, render) {
  const key = JSON.stringify(data);
  if (drawn.get(region) === key) return;
  drawn.set(region, key);
  const drawnNodes = render(data);
  region.replaceChildren(...(Array.isArray(drawnNodes) ? drawnNodes.flat() : [drawnNodes]));
}

// -- formatting ------------------------------------------------------------------------------

export function dateTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

export function ago(iso, now = Date.now()) {
  if (!iso) return "never";
  const s = Math.round((now - new Date(iso).getTime()) / 1000);
  if (s < 5) return "just now";
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

// A time element: the relative time shown, the exact one in its title and datetime.
export function when(iso) {
  if (!iso) return h("span", { class: "muted" }, "never");
  return h("time", { class: "ago", datetime: iso, title: dateTime(iso) }, ago(iso));
}

export function percent(x, digits = 1) {
  return x === null || x === undefined ? "—" : `${(x * 100).toFixed(digits)}%`;
}

export function number(x, digits = 3) {
  if (x === null || x === undefined) return "—";
  if (Number.isInteger(x)) return x.toLocaleString();
  return Number(x.toPrecision(digits)).toString();
}

export function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function short(sha) {
  return sha ? sha.slice(0, 12) : "—";
}

// -- pieces ----------------------------------------------------------------------------------

const TONES = {
  good: ["healthy", "completed", "committed", "passed", "ok", "online", "treatment_better", "no_difference"],
  bad: [
    "aborted", "failed", "refused", "rolled_back", "rollback_failed", "deadline", "lost",
    "offline", "alert", "treatment_worse", "not_rolled_back",
  ],
  warn: ["degraded", "paused", "awaiting_approval", "warn", "rolling_back", "rollback_pending", "superseded", "unknown", "insufficient"],
  busy: ["running", "published", "received", "downloading", "verifying", "loading", "probation", "publishing", "waiting", "soaking", "gating"],
};

export function tone(word) {
  for (const [name, words] of Object.entries(TONES)) if (words.includes(word)) return name;
  return "plain";
}

export function badge(word, label = word) {
  return h("span", { class: `badge ${tone(word)}` }, String(label ?? "—").replaceAll("_", " "));
}

export function link(href, text) {
  return h("a", { href }, text);
}

// A table with a caption; columns: [{label, cell: row => node|string, numeric?}].
export function table({ caption, columns, rows, empty = "Nothing here yet.", id }) {
  if (!rows.length) return h("p", { class: "empty", id }, empty);
  // A column without a visible heading still has one for screen readers (c.hidden).
  const head = h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.numeric ? "num" : null }, c.label || h("span", { class: "sr-only" }, c.hidden))));
  const body = rows.map((row) =>
    h("tr", {}, columns.map((c) => h("td", { class: c.numeric ? "num" : null }, c.cell(row)))),
  );
  return h(
    "div",
    { class: "table-wrap", tabindex: "0", role: "region", "aria-label": caption },
    h("table", { id }, h("caption", {}, caption), h("thead", {}, head), h("tbody", {}, body)),
  );
}

// A definition list of [term, value] pairs.
export function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value ?? "—")]));
}

export function section(title, ...children) {
  const id = `s-${title.toLowerCase().replace(/[^a-z0-9]+/g, "-")}`;
  return h("section", { class: "panel", "aria-labelledby": id }, h("h2", { id }, title), children);
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error.message ?? String(error));
}

export function field(label, control, hint) {
  const id = control.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  control.id = id;
  const hintId = hint ? `${id}-hint` : undefined;
  if (hintId) control.setAttribute("aria-describedby", hintId);
  return h("div", { class: "field" }, h("label", { for: id }, label), control, hint ? h("small", { id: hintId }, hint) : null);
}

export function select(name, options, value) {
  return h(
    "select",
    { name },
    options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)),
  );
}

// Asks before an action; resolves to {reason} when confirmed, null when cancelled.
export function confirmAction({ title, message, confirm, danger = false, reason = true }) {
  return new Promise((resolve) => {
    const text = h("textarea", { name: "reason", rows: "3", maxlength: "500" });
    const form = h(
      "form",
      { method: "dialog" },
      h("h2", {}, title),
      h("p", {}, message),
      reason ? field("Reason (kept in the audit log)", text) : null,
      h(
        "div",
        { class: "actions" },
        h("button", { value: "cancel", type: "submit", class: "secondary" }, "Cancel"),
        h("button", { value: "confirm", type: "submit", class: danger ? "danger" : "primary" }, confirm),
      ),
    );
    const dialog = h("dialog", { "aria-label": title }, form);
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(dialog.returnValue === "confirm" ? { reason: text.value.trim() || null } : null);
    });
    document.body.append(dialog);
    dialog.showModal();
    (reason ? text : form.querySelector("button.secondary")).focus();
  });
}

export function say(message, kind = "info") {
  const toast = document.getElementById("toast");
  toast.className = `toast ${kind}`;
  toast.textContent = message;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => {
    toast.textContent = "";
    toast.className = "";
  }, kind === "error" ? 12000 : 5000);
}
