// The console's only way to the fleet: the REST API under /api/v1, with the signed-in token.
// Refusals come back as {"error": message, "reason": word}; they become ApiError, whose
// message is the API's own (it names the problem and what to do next).

const TOKEN_KEY = "edgefleet.console.token";
const RANKS = { viewer: 0, operator: 1, admin: 2 };

export class ApiError extends Error {
  constructor(status, reason, message) {
    super(message);
    this.status = status;
    this.reason = reason;
  }
}

// The token lives in sessionStorage: it is gone when the tab closes, and never in a cookie.
export const session = {
  me: null,
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  remember(token, me) {
    sessionStorage.setItem(TOKEN_KEY, token);
    this.me = me;
  },
  forget() {
    sessionStorage.removeItem(TOKEN_KEY);
    this.me = null;
  },
  // Whether the signed-in token's role is `role` or above.
  can(role) {
    return this.me !== null && RANKS[this.me.role] >= RANKS[role];
  },
};

export async function api(path, { method = "GET", body, token = session.token } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`/api/v1${path}`, init);
  } catch {
    throw new ApiError(
      0,
      "unreachable",
      "cannot reach the fleet service; check that `edgefleet fleet serve` is running",
    );
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const reason = data?.reason ?? "error";
    const message = data?.error ?? `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, reason, message);
  }
  return data;
}

// A query string from the defined values of `params` ("" when none).
export function query(params) {
  const defined = Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== "");
  return defined.length ? `?${new URLSearchParams(defined)}` : "";
}
