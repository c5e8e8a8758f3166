// Rollouts: every rollout with its progress, and the form that starts a new one (operators).
// The form sends exactly the RolloutSpec the API takes; the API checks it and its refusal,
// which names the field, is shown as it is.

import { api, session } from "../api.js";
import { badge, field, h, link, patch, say, select, table, tone, when } from "../ui.js";

// A bar with the rollout's devices by outcome: committed, failed, in flight, waiting.
export function rolloutProgress(r) {
  const counts = {};
  for (const w of r.waves) for (const [status, n] of Object.entries(w.counts)) counts[status] = (counts[status] ?? 0) + n;
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  const parts = { good: 0, bad: 0, busy: 0, warn: 0 };
  for (const [status, n] of Object.entries(counts)) {
    const t = tone(status);
    if (t in parts) parts[t] += n;
  }
  const wave = r.waves.length ? `wave ${Math.min(r.wave + 1, r.waves.length)} of ${r.waves.length}` : "";
  const label = `${parts.good} of ${total} devices updated, ${parts.bad} failed or rolled back; ${wave}`;
  return h(
    "div",
    { class: "progress-box" },
    h(
      "div",
      { class: "progress", role: "img", "aria-label": label, title: label },
      Object.entries(parts).map(([t, n]) => {
        if (!n) return null;
        const bar = h("span", { class: t });
        bar.style.width = `${(100 * n) / total}%`; // the CSSOM: the CSP refuses style attributes
        return bar;
      }),
    ),
    h("small", { class: "muted" }, `${parts.good}/${total} updated · ${wave}`),
  );
}

export async function list(view) {
  const region = h("div", { id: "rollout-list" });
  view.main.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", { tabindex: "-1" }, "Rollouts"),
      session.can("operator") ? link("#/rollouts/new", "Start a rollout…") : null,
    ),
    region,
  );
  await view.every(3000, async () => {
    const rollouts = (await api("/rollouts")).reverse();
    patch(region, rollouts, () =>
      table({
        id: "rollouts",
        caption: "Every rollout, newest first",
        empty: "No rollout yet.",
        rows: rollouts,
        columns: [
          { label: "Rollout", cell: (r) => link(`#/rollouts/${r.id}`, r.id) },
          { label: "Version", cell: (r) => `${r.model} ${r.version}` },
          { label: "State", cell: (r) => badge(r.state) },
          { label: "Progress", cell: rolloutProgress },
          { label: "Experiment", cell: (r) => r.policy.experiment?.mode ?? "—" },
          { label: "Started", cell: (r) => [when(r.created_at), h("span", { class: "muted" }, ` by ${r.created_by}`)] },
          { label: "Reason", cell: (r) => r.reason ?? "" },
        ],
      }),
    );
  });
}

function numberInput(name, value, attrs = {}) {
  return h("input", { type: "number", name, value, step: "any", ...attrs });
}

function checkboxes(legend, name, options) {
  return h(
    "fieldset",
    {},
    h("legend", {}, legend),
    options.length
      ? options.map((o) => h("label", { class: "check" }, h("input", { type: "checkbox", name, value: o.name }), ` ${o.name} (${o.devices}) `))
      : h("p", { class: "muted" }, "None yet."),
  );
}

// A number from an optional field: blank turns a gate off (null).
function optional(form, name) {
  const raw = form.elements[name].value.trim();
  return raw === "" ? null : Number(raw);
}

export async function create(view) {
  view.main.append(h("p", { class: "crumbs" }, link("#/rollouts", "Rollouts"), " / new"), h("h1", { tabindex: "-1" }, "Start a rollout"));
  if (!session.can("operator")) {
    view.main.append(h("p", { class: "error" }, "Starting a rollout needs an operator or admin token."));
    return;
  }
  const [models, groups, tags] = await Promise.all([api("/models"), api("/groups"), api("/tags")]);
  if (!models.length) {
    view.main.append(h("p", { class: "empty" }, "Publish a model version first: `edgefleet fleet publish BUNDLE.efb`."));
    return;
  }
  const wanted = { model: view.query.get("model") ?? models[0].name, version: view.query.get("version") };
  const modelBox = select("model", models.map((m) => [m.name, m.name]), wanted.model);
  const versionBox = h("select", { name: "version" });
  let listed = null; // the model whose versions the version box lists
  const fillVersions = async () => {
    const model = modelBox.value;
    if (model === listed) return; // the same model again: keep what the reader picked
    const detail = await api(`/models/${encodeURIComponent(model)}`);
    if (model !== modelBox.value) return; // the reader picked another model meanwhile
    listed = model;
    const versions = [...detail.versions].reverse();
    versionBox.replaceChildren(...versions.map((v) => h("option", { value: v.version, selected: v.version === wanted.version }, v.version)));
  };
  modelBox.addEventListener("change", fillVersions);
  await fillVersions();
  const problem = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "panel", id: "rollout-form", novalidate: true },
    h("div", { class: "form-grid" }, field("Model", modelBox), field("Version", versionBox)),
    h(
      "div",
      { class: "form-grid" },
      checkboxes("Devices in any of these groups", "groups", groups),
      checkboxes("…carrying all of these tags", "tags", tags),
      h("fieldset", {}, h("legend", {}, "Or"), h("label", {}, h("input", { type: "checkbox", name: "all_devices" }), " every device of the fleet")),
    ),
    h(
      "div",
      { class: "form-grid" },
      field("Waves (cumulative percent)", h("input", { name: "waves", value: "1,10,50,100", required: true }), "Each wave's share of the devices, ending at 100."),
      field("Soak (seconds)", numberInput("soak_s", 60, { min: 0 }), "How long each wave runs before its gates judge it."),
      field("Wave deadline (seconds)", numberInput("wave_deadline_s", 600, { min: 1 })),
      field("Approval", select("approval", [["auto", "automatic"], ["manual", "an operator approves every next wave"]], "auto")),
      field("On a failed gate", select("on_failure", [["abort", "abort and roll back"], ["pause", "pause"]], "abort")),
    ),
    h(
      "details",
      {},
      h("summary", {}, "Gate thresholds"),
      h(
        "div",
        { class: "form-grid" },
        field("Requests before rate gates judge", numberInput("min_requests", 100, { min: 0, step: 1 })),
        field("Max failed share", numberInput("max_failed_share", 0.1, { min: 0, max: 1 }), "a fraction: 0.1 = 10% of the wave's devices failed, refused, rolled back or silent"),
        field("Max error rate increase", numberInput("max_error_rate_increase", 0.01, { min: 0, max: 1 }), "a fraction: 0.01 = 1 percentage point over the previous version; blank turns the gate off"),
        field("Max p95 latency ratio", numberInput("max_latency_ratio", 1.5, { min: 0 }), "new p95 / previous p95; blank turns the gate off"),
        field("Max fallback rate increase", numberInput("max_fallback_rate_increase", 0.01, { min: 0, max: 1 }), "a fraction: 0.01 = 1 percentage point; blank turns the gate off"),
        field("Max prediction PSI", numberInput("max_prediction_psi", 0.25, { min: 0 }), "blank turns the gate off"),
        field("Max feature PSI", numberInput("max_feature_psi", 0.25, { min: 0 }), "blank turns the gate off"),
      ),
    ),
    h(
      "details",
      {},
      h("summary", {}, "Experiment"),
      h(
        "div",
        { class: "form-grid" },
        field("Mode", select("experiment", [["", "none: a plain rollout"], ["ab", "A/B: split the devices"], ["shadow", "shadow: run beside, never answer"]], "")),
        field("Treatment share (A/B)", numberInput("split", 0.5, { min: 0, max: 1 })),
        field("Significance level", numberInput("alpha", 0.05, { min: 0, max: 0.5 })),
        field("Requests per arm before a verdict", numberInput("min_samples", 1000, { min: 1, step: 1 })),
      ),
    ),
    h("label", {}, h("input", { type: "checkbox", name: "supersede" }), " take devices over from another active rollout of this model"),
    problem,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Start rollout"), link("#/rollouts", "Cancel")),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = form.elements;
    const picked = (name) => [...form.querySelectorAll(`input[name="${name}"]:checked`)].map((x) => x.value);
    const waves = f.waves.value.split(",").map((x) => x.trim()).filter(Boolean).map(Number);
    const spec = {
      model: f.model.value,
      version: f.version.value,
      selector: { groups: picked("groups"), tags: picked("tags"), all_devices: f.all_devices.checked },
      policy: {
        waves,
        soak_s: Number(f.soak_s.value),
        wave_deadline_s: Number(f.wave_deadline_s.value),
        approval: f.approval.value,
        on_failure: f.on_failure.value,
        gates: {
          min_requests: Number(f.min_requests.value),
          max_failed_share: Number(f.max_failed_share.value),
          max_error_rate_increase: optional(form, "max_error_rate_increase"),
          max_latency_ratio: optional(form, "max_latency_ratio"),
          max_fallback_rate_increase: optional(form, "max_fallback_rate_increase"),
          max_prediction_psi: optional(form, "max_prediction_psi"),
          max_feature_psi: optional(form, "max_feature_psi"),
        },
        experiment: f.experiment.value
          ? { mode: f.experiment.value, split: Number(f.split.value), alpha: Number(f.alpha.value), min_samples: Number(f.min_samples.value) }
          : null,
      },
      supersede: f.supersede.checked,
    };
    try {
      const created = await api("/rollouts", { method: "POST", body: spec });
      say(`Rollout ${created.id} started.`);
      view.go(`#/rollouts/${created.id}`);
    } catch (error) {
      problem.replaceChildren(h("p", { class: "error", role: "alert" }, error.message));
    }
  });
  view.main.append(form);
}
