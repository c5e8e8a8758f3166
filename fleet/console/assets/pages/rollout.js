// One rollout: the commands an operator may give in its state, its waves with each gate's value
// against its threshold, every device's progress, its experiment verdict, and its timeline from
// the audit log.

import { api, query, session } from "../api.js";
import { gateMeter } from "../charts.js";
import { badge, confirmAction, dateTime, facts, h, link, number, patch, percent, say, section, table, when } from "../ui.js";
import { rolloutProgress } from "./rollouts.js";

const ACTIVE = ["created", "running", "awaiting_approval", "paused"];
const RATES = ["error_rate", "fallback_rate", "failed_installs"];
// A gate's result: passed, failed, or not judged for want of samples.
const RESULT = (g) => (g.passed === null ? "insufficient" : g.passed ? "passed" : "failed");

// Which commands fit which states; the API refuses the others with rollout_conflict.
const COMMANDS = [
  {
    name: "approve",
    label: "Approve next wave",
    when: (r) => r.state === "awaiting_approval",
    ask: (r) => ({
      title: "Approve the next wave?",
      message: [
        r.wave + 1 >= r.waves.length ? `Approving completes rollout ${r.id}.` : `Rollout ${r.id} goes on to wave ${r.wave + 2} of ${r.waves.length}.`,
        r.reason ? ` It waits because: ${r.reason}` : "",
      ].join(""),
      confirm: "Approve",
    }),
  },
  {
    name: "pause",
    label: "Pause",
    when: (r) => ["running", "awaiting_approval", "created"].includes(r.state),
    ask: (r) => ({ title: "Pause this rollout?", message: `Rollout ${r.id} holds where it stands; devices keep what they run.`, confirm: "Pause" }),
  },
  {
    name: "resume",
    label: "Resume",
    when: (r) => r.state === "paused",
    ask: (r) => ({
      title: "Resume this rollout?",
      message:
        r.waves[r.wave]?.state === "failed"
          ? `Wave ${r.wave + 1} failed its gates (${r.reason ?? "see the gates"}); resuming accepts it and starts the next wave, or completes the rollout after the last one.`
          : `Rollout ${r.id} goes on from where it stood.`,
      confirm: "Resume",
    }),
  },
  {
    name: "abort",
    label: "Abort and roll back",
    danger: true,
    when: (r) => ACTIVE.includes(r.state),
    ask: (r) => ({ title: "Abort this rollout?", message: `Every device rollout ${r.id} touched goes back to the version it ran before, where that version is published.`, confirm: "Abort and roll back", danger: true }),
  },
];

function gateValue(g, value) {
  if (value === null || value === undefined) return "—";
  return RATES.includes(g.name) ? percent(value, 2) : number(value, 3);
}

function gates(wave) {
  return table({
    caption: `Gates of wave ${wave.index + 1}`,
    empty: "Not judged yet: gates run after the wave's devices settle and soak.",
    rows: wave.gates,
    columns: [
      { label: "Gate", cell: (g) => g.name.replaceAll("_", " ") },
      { label: "Value", numeric: true, cell: (g) => gateValue(g, g.value) },
      { label: "Threshold", numeric: true, cell: (g) => gateValue(g, g.threshold) },
      { label: "", hidden: "value against threshold", cell: (g) => (g.value === null ? "" : gateMeter(g.value, g.threshold, g.passed)) },
      { label: "Result", cell: (g) => badge(RESULT(g)) },
      { label: "Samples", numeric: true, cell: (g) => number(g.samples) },
      { label: "Detail", cell: (g) => h("span", { class: "muted" }, g.detail) },
    ],
  });
}

function waves(r) {
  return h(
    "div",
    { class: "waves-list" },
    r.waves.map((w) =>
      h(
        "article",
        { class: `wave panel ${w.index === r.wave && ACTIVE.includes(r.state) ? "current" : ""}`, "aria-label": `Wave ${w.index + 1}` },
        h("h3", {}, h("span", {}, `Wave ${w.index + 1}: ${number(w.percent)}% · ${w.devices} device${w.devices === 1 ? "" : "s"}`), badge(w.state)),
        h(
          "p",
          { class: "muted" },
          w.started_at ? `started ${dateTime(w.started_at)}` : "not started",
          w.finished_at ? ` · finished ${dateTime(w.finished_at)}` : "",
          Object.keys(w.counts).length ? ` · ${Object.entries(w.counts).map(([s, n]) => `${n} ${s.replaceAll("_", " ")}`).join(", ")}` : "",
        ),
        gates(w),
      ),
    ),
  );
}

function experiment(v) {
  const arms = [v.treatment, v.control];
  return h(
    "div",
    {},
    facts([
      ["Verdict", badge(v.verdict)],
      ["Why", v.reason],
      ["Mode", v.mode],
      ["Significance level", number(v.alpha)],
      ["Computed", when(v.computed_at)],
    ]),
    table({
      caption: "Arms",
      rows: arms,
      columns: [
        { label: "Arm", cell: (a) => a.name },
        { label: "Role", cell: (a) => a.role },
        { label: "Versions", cell: (a) => a.versions.join(", ") || "—" },
        { label: "Devices", numeric: true, cell: (a) => a.devices },
        { label: "Requests", numeric: true, cell: (a) => number(a.requests) },
        { label: "Errors", numeric: true, cell: (a) => number(a.errors) },
        { label: "Fallbacks", numeric: true, cell: (a) => number(a.fallbacks) },
        { label: "p95 (ms)", numeric: true, cell: (a) => number(a.latency_p95_ms) },
      ],
    }),
    table({
      id: "experiment-metrics",
      caption: "Each metric's significance test",
      rows: v.metrics,
      columns: [
        { label: "Metric", cell: (m) => m.name.replaceAll("_", " ") },
        { label: "Treatment", numeric: true, cell: (m) => (m.name === "latency" ? `${number(m.treatment)} ms` : percent(m.treatment, 2)) },
        { label: "Control", numeric: true, cell: (m) => (m.name === "latency" ? `${number(m.control)} ms` : percent(m.control, 2)) },
        { label: "Test", cell: (m) => m.test.replaceAll("_", " ") },
        { label: "p-value", numeric: true, cell: (m) => (m.p_value === null ? "—" : number(m.p_value, 3)) },
        { label: "Significant", cell: (m) => (m.significant ? badge(m.better === "treatment" ? "treatment_better" : "treatment_worse", `${m.better} better`) : "no") },
      ],
    }),
    v.agreement
      ? h("p", {}, `Shadow agreement: ${percent(v.agreement.rate, 2)} of ${number(v.agreement.compared)} rows (${percent(v.agreement.confidence, 0)} interval ${percent(v.agreement.low, 2)}–${percent(v.agreement.high, 2)}).`)
      : null,
  );
}

function timeline(r, entries) {
  const waveEvents = r.waves.flatMap((w) => [
    w.started_at ? { at: w.started_at, text: `wave ${w.index + 1} (${number(w.percent)}%) started`, tone: "" } : null,
    w.finished_at ? { at: w.finished_at, text: `wave ${w.index + 1} ${w.state}`, tone: w.state === "failed" ? "bad" : "good" } : null,
  ]);
  const audit = entries.map((e) => ({
    at: e.at,
    text: `${e.action.replace("rollout.", "").replaceAll("_", " ")} by ${e.actor}${e.detail?.reason ? `: ${e.detail.reason}` : ""}`,
    tone: /abort|fail|rolled/.test(e.action) ? "bad" : /completed|passed/.test(e.action) ? "good" : "",
  }));
  const events = [...waveEvents.filter(Boolean), ...audit].sort((a, b) => new Date(a.at) - new Date(b.at));
  return h(
    "ol",
    { class: "timeline", id: "timeline" },
    events.map((e) => h("li", { class: e.tone }, h("time", { datetime: e.at }, dateTime(e.at)), e.text)),
  );
}

function actions(r, refresh) {
  if (!session.can("operator")) return h("p", { class: "muted" }, "Operators can approve, pause, resume and abort rollouts.");
  const fitting = COMMANDS.filter((c) => c.when(r));
  if (!fitting.length) return h("p", { class: "muted" }, `The rollout is ${r.state.replaceAll("_", " ")}: no command applies.`);
  return h(
    "div",
    { class: "actions", role: "group", "aria-label": "Rollout commands" },
    fitting.map((c) =>
      h(
        "button",
        {
          type: "button",
          class: c.danger ? "danger" : "primary",
          "data-command": c.name,
          onclick: async () => {
            const answer = await confirmAction(c.ask(r));
            if (answer === null) return;
            try {
              await api(`/rollouts/${r.id}/${c.name}`, { method: "POST", body: answer });
              say(`Rollout ${r.id}: ${c.name} done.`);
              await refresh();
            } catch (error) {
              say(error.message, "error");
            }
          },
        },
        c.label,
      ),
    ),
  );
}

export async function detail(view) {
  const [id] = view.params;
  const head = h("div", {});
  const commands = h("div", { id: "commands" });
  const waveRegion = h("div", { id: "waves" });
  const deviceRegion = h("div", {});
  const experimentRegion = h("div", { id: "experiment" });
  const timelineRegion = h("div", {});
  view.main.append(
    h("p", { class: "crumbs" }, link("#/rollouts", "Rollouts"), " / ", id),
    h("h1", { tabindex: "-1" }, `Rollout ${id}`),
    head,
    section("Commands", commands),
    section("Waves and gates", waveRegion),
  );
  const experimentSection = section("Experiment", experimentRegion);
  experimentSection.hidden = true;
  const refresh = async () => {
    const [r, entries] = await Promise.all([api(`/rollouts/${id}`), api(`/audit${query({ subject: id, limit: 500 })}`)]);
    patch(head, [r.state, r.phase, r.reason, r.wave, r.waves.map((w) => w.counts)], () =>
      h(
        "div",
        { class: "panel" },
        facts([
          ["Version", link(`#/models/${encodeURIComponent(r.model)}/${encodeURIComponent(r.version)}`, `${r.model} ${r.version}`)],
          ["State", [badge(r.state), r.phase ? h("span", { class: "muted" }, ` · ${r.phase.replaceAll("_", " ")}`) : null]],
          ["Progress", rolloutProgress(r)],
          ["Reason", r.reason ?? "—"],
          ["Devices", r.selector.all_devices ? "every device" : [r.selector.groups.length ? `groups ${r.selector.groups.join(", ")}` : "", r.selector.tags.length ? ` tagged ${r.selector.tags.join(", ")}` : ""].join("")],
          ["Policy", `waves ${r.policy.waves.join(" → ")}% · soak ${r.policy.soak_s} s · approval ${r.policy.approval} · on failure ${r.policy.on_failure}`],
          ["Started", `${dateTime(r.created_at)} by ${r.created_by}`],
          r.superseded_by ? ["Superseded by", link(`#/rollouts/${r.superseded_by}`, r.superseded_by)] : ["Updated", when(r.updated_at)],
        ].filter(Boolean)),
      ),
    );
    patch(commands, [r.state, r.wave, session.me.role], () => actions(r, refresh));
    patch(waveRegion, r.waves, () => waves(r));
    patch(deviceRegion, r.devices, () =>
      table({
        id: "rollout-devices",
        caption: "Every device of the rollout",
        rows: r.devices,
        columns: [
          { label: "Device", cell: (a) => link(`#/devices/${encodeURIComponent(a.device)}`, a.device) },
          { label: "Wave", numeric: true, cell: (a) => a.wave + 1 },
          { label: "Was on", cell: (a) => a.previous_version ?? "—" },
          { label: "Status", cell: (a) => badge(a.status) },
          { label: "Why", cell: (a) => [a.reason ?? "", a.detail ? h("div", { class: "muted" }, a.detail) : null] },
        ],
      }),
    );
    if (r.policy.experiment) {
      experimentSection.hidden = false;
      const verdict = await api(`/rollouts/${id}/experiment`);
      const { computed_at: _, ...stable } = verdict;
      patch(experimentRegion, stable, () => experiment(verdict));
    }
    patch(timelineRegion, [entries, r.waves.map((w) => [w.started_at, w.finished_at])], () => timeline(r, entries));
  };
  view.main.append(experimentSection, section("Devices", deviceRegion), section("Timeline", timelineRegion));
  await view.every(2000, refresh);
}
