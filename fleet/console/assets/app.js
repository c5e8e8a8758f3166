// The console's shell: sign-in with an API token, the hash router, and live updates by polling.
// A page is a function that builds its skeleton into `view.main` and registers what refreshes
// with `view.every(ms, fn)`; the router stops those timers when the page changes.

import { api, ApiError, session } from "./api.js";
import { ago, h, field, errorBox } from "./ui.js";
import * as overview from "./pages/overview.js";
import * as devices from "./pages/devices.js";
import * as models from "./pages/models.js";
import * as rollouts from "./pages/rollouts.js";
import * as rollout from "./pages/rollout.js";
import * as audit from "./pages/audit.js";
import * as tokens from "./pages/tokens.js";

const ROUTES = [
  [/^\/$/, overview.render, "Overview"],
  [/^\/devices$/, devices.list, "Devices"],
  [/^\/devices\/([^/]+)$/, devices.detail, "Device"],
  [/^\/models$/, models.list, "Models"],
  [/^\/models\/([^/]+)\/([^/]+)$/, models.version, "Model version"],
  [/^\/rollouts$/, rollouts.list, "Rollouts"],
  [/^\/rollouts\/new$/, rollouts.create, "New rollout"],
  [/^\/rollouts\/([^/]+)$/, rollout.detail, "Rollout"],
  [/^\/audit$/, audit.render, "Audit log"],
  [/^\/tokens$/, tokens.render, "Tokens"],
];

const main = document.getElementById("main");
const live = document.getElementById("live");
const announce = document.getElementById("announce");
let timers = [];
let generation = 0;

function stopTimers() {
  for (const timer of timers) clearInterval(timer);
  timers = [];
}

function where() {
  const [path, search = ""] = location.hash.replace(/^#/, "").split("?");
  return { path: path || "/", query: new URLSearchParams(search) };
}

function signedOut(message) {
  session.forget();
  stopTimers();
  showSession();
  renderLogin(message);
}

// Run `refresh` now and every `ms` while this page is shown and the tab is visible; one run at
// a time, so a slow answer never lands after a newer one.
function every(page, ms, refresh) {
  let busy = false;
  const run = async () => {
    if (page !== generation || document.hidden || busy) return;
    busy = true;
    try {
      await refresh();
      if (page === generation) showLive(`Live · updated ${new Date().toLocaleTimeString()}`, "ok");
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) return signedOut(error.message);
      if (page === generation) showLive(`Not updating: ${error.message}`, "stale");
    } finally {
      busy = false;
    }
  };
  timers.push(setInterval(run, ms));
  return run();
}

// The line under the header; screen readers hear it only when it turns stale or live again.
let liveState = "";
function showLive(text, state) {
  live.textContent = text;
  live.className = `live ${state}`;
  if (state !== liveState) {
    liveState = state;
    announce.textContent = state === "stale" ? text : liveState && "Live again";
  }
}

// `moved`: the reader went to another page, so focus goes to its heading (not on first load,
// where the keyboard starts at the top of the page, at "Skip to content").
async function route(moved = true) {
  if (location.hash && !location.hash.startsWith("#/")) return; // an in-page anchor, not a page
  stopTimers();
  generation += 1;
  const page = generation;
  if (!session.token) return renderLogin();
  if (session.me === null) {
    try {
      session.me = await api("/me");
    } catch (error) {
      return signedOut(error instanceof ApiError && error.status === 401 ? error.message : undefined);
    }
    if (page !== generation) return;
    showSession();
  }
  const { path, query } = where();
  const match = ROUTES.map(([pattern, render, title]) => [path.match(pattern), render, title]).find(([m]) => m);
  markNav(path);
  if (!match) {
    document.title = "Not found · edgefleet";
    main.replaceChildren(h("h1", { tabindex: "-1" }, "Not found"), h("p", {}, "No page at ", h("code", {}, path), ". ", h("a", { href: "#/" }, "Go to the overview.")));
    return;
  }
  const [groups, render, title] = match;
  document.title = `${title} · edgefleet`;
  // Each page renders into its own container: a page still loading when the reader moves on
  // fills a container that is no longer shown.
  const container = h("div", { class: "page" });
  main.replaceChildren(container);
  const view = {
    main: container,
    query,
    params: groups.slice(1).map(decoded),
    every: (ms, refresh) => every(page, ms, refresh),
    go: (hash) => {
      location.hash = hash;
    },
  };
  try {
    await render(view);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return signedOut(error.message);
    container.append(errorBox(error));
  }
  if (page !== generation) return;
  if (moved) container.querySelector("h1")?.focus({ preventScroll: true });
  else if (keep) container.querySelector(`[name="${keep}"]`)?.focus();
}

function decoded(part) {
  try {
    return decodeURIComponent(part);
  } catch {
    return part;
  }
}

function markNav(path) {
  for (const a of document.querySelectorAll("#nav a")) {
    const target = a.getAttribute("href").slice(1);
    const current = target === "/" ? path === "/" : path.startsWith(target);
    if (current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function showSession() {
  const box = document.getElementById("session");
  const nav = document.getElementById("nav");
  nav.hidden = session.me === null;
  for (const item of nav.querySelectorAll("[data-role]")) item.hidden = !session.can(item.dataset.role);
  if (session.me === null) {
    box.replaceChildren();
    return;
  }
  box.replaceChildren(
    h("span", { class: "who" }, session.me.name, " ", h("span", { class: `role ${session.me.role}` }, session.me.role)),
    h("button", { type: "button", class: "secondary", onclick: () => signedOut() }, "Sign out"),
  );
}

function renderLogin(message) {
  document.title = "Sign in · edgefleet";
  live.textContent = "";
  const input = h("input", { type: "password", name: "token", autocomplete: "off", required: true, spellcheck: "false" });
  const problem = h("div", {});
  const form = h(
    "form",
    {
      class: "login panel",
      onsubmit: async (event) => {
        event.preventDefault();
        const token = input.value.trim();
        try {
          const me = await api("/me", { token });
          session.remember(token, me);
          showSession();
          route();
        } catch (error) {
          problem.replaceChildren(errorBox(error));
          input.focus();
        }
      },
    },
    h("h1", { tabindex: "-1" }, "Sign in to the fleet console"),
    message ? h("p", { class: "error", role: "alert" }, message) : null,
    field(
      "API token",
      input,
      "An efa_… token. The first admin token is in <home>/admin.token; an admin makes more under Tokens or with `edgefleet fleet tokens create NAME --role operator`.",
    ),
    problem,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Sign in")),
  );
  main.replaceChildren(form);
  input.focus();
}

// A new page moves the focus to its heading; new filters on the same page keep it on the filter.
let shownPath = where().path;
let keep = null;
addEventListener("hashchange", () => {
  const { path } = where();
  keep = path === shownPath ? document.activeElement?.name || null : null;
  shownPath = path;
  route(keep === null);
});
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});
// Relative times ("2 min ago") stay true while their region is not redrawn.
setInterval(() => {
  for (const time of document.querySelectorAll("time.ago")) time.textContent = ago(time.dateTime);
}, 15000);
showSession();
route(false);
