// API tokens (admins): who may use the console and the API, with which role. A new token's
// secret is shown once, here; the fleet keeps only its hash.

import { api, session } from "../api.js";
import { badge, confirmAction, field, h, patch, say, section, select, table, when } from "../ui.js";

// The clipboard exists only on https or localhost; elsewhere the secret is selected to copy.
function copy(shown, secret) {
  const select = () => {
    getSelection().selectAllChildren(shown);
    say("Selected: press Ctrl+C (⌘C) to copy.");
  };
  if (!navigator.clipboard) return select();
  navigator.clipboard.writeText(secret).then(() => say("Copied."), select);
}

export async function render(view) {
  view.main.append(h("h1", { tabindex: "-1" }, "API tokens"));
  if (!session.can("admin")) {
    view.main.append(h("p", { class: "error" }, "Managing tokens needs an admin token."));
    return;
  }
  const region = h("div", { id: "token-list" });
  const created = h("div", { "aria-live": "polite" });
  const name = h("input", { name: "name", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._@:\\-]{0,63}", autocomplete: "off" });
  const role = select("role", [["viewer", "viewer: reads everything"], ["operator", "operator: also publishes, labels, runs rollouts"], ["admin", "admin: also manages tokens"]], "viewer");
  let showRevoked = false;
  const revokedBox = h("input", { type: "checkbox", name: "revoked" });

  const refresh = async () => {
    const tokens = await api(`/tokens?include_revoked=${showRevoked}`);
    patch(region, tokens, () =>
      table({
        id: "tokens",
        caption: showRevoked ? "Every token, revoked ones too" : "Active tokens",
        rows: tokens,
        columns: [
          { label: "Name", cell: (t) => t.name },
          { label: "Role", cell: (t) => badge("plain", t.role) },
          { label: "Id", cell: (t) => h("code", {}, t.id) },
          { label: "Created", cell: (t) => [when(t.created_at), h("span", { class: "muted" }, ` by ${t.created_by}`)] },
          { label: "Last used", cell: (t) => when(t.last_used_at) },
          {
            label: "",
            hidden: "revoke",
            cell: (t) =>
              t.revoked_at
                ? badge("revoked", `revoked ${new Date(t.revoked_at).toLocaleDateString()}`)
                : h(
                    "button",
                    {
                      type: "button",
                      class: "danger",
                      "aria-label": `Revoke ${t.name}`,
                      onclick: async () => {
                        const ok = await confirmAction({
                          title: `Revoke ${t.name}?`,
                          message: "The next request with this token is refused. This cannot be undone.",
                          confirm: "Revoke",
                          danger: true,
                          reason: false,
                        });
                        if (ok === null) return;
                        try {
                          await api(`/tokens/${t.id}`, { method: "DELETE" });
                          say(`Token ${t.name} revoked.`);
                          await refresh();
                        } catch (error) {
                          say(error.message, "error");
                        }
                      },
                    },
                    "Revoke",
                  ),
          },
        ],
      }),
    );
  };
  revokedBox.addEventListener("change", () => {
    showRevoked = revokedBox.checked;
    refresh();
  });
  const form = h(
    "form",
    {
      class: "filters",
      "aria-label": "Make a token",
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          const made = await api("/tokens", { method: "POST", body: { name: name.value.trim(), role: role.value } });
          const secret = h("code", { id: "new-secret" }, made.secret);
          created.replaceChildren(
            h(
              "div",
              { class: "panel" },
              h("p", {}, `Token ${made.token.name} (${made.token.role}) made. Copy its secret now: it is not shown again.`),
              h(
                "div",
                { class: "secret" },
                secret,
                h("button", { type: "button", class: "secondary", onclick: () => copy(secret, made.secret) }, "Copy"),
              ),
            ),
          );
          name.value = "";
          await refresh();
        } catch (error) {
          created.replaceChildren(h("p", { class: "error", role: "alert" }, error.message));
        }
      },
    },
    field("Name (who or what uses it)", name),
    field("Role", role),
    h("div", { class: "field" }, h("button", { type: "submit", class: "primary" }, "Make token")),
  );
  view.main.append(
    section("Make a token", form, created),
    section("Tokens", h("label", {}, revokedBox, " show revoked tokens"), region),
  );
  await view.every(10000, refresh);
}
