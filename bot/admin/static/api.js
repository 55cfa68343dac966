// Thin client for /admin/api: bearer token from sessionStorage, JSON errors as ApiError.

const KEY = "voicebot.admin.token";

export class ApiError extends Error {
  constructor(status, detail) {
    const msg = typeof detail === "string" ? detail : (detail && detail.message) || `HTTP ${status}`;
    super(msg);
    this.status = status;
    this.detail = detail;
  }
  get errors() {
    return (this.detail && this.detail.errors) || [];
  }
}

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

// keepalive: the request outlives the page (sent from pagehide: a tab closed mid-call)
export async function api(path, { method = "GET", json, form, keepalive = false } = {}) {
  const headers = { Authorization: `Bearer ${token.get() || ""}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  const res = await fetch(`/admin/api${path}`, { method, headers, body, keepalive });
  if (res.status === 204) return null;
  let data = null;
  const text = await res.text();
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!res.ok) throw new ApiError(res.status, data && data.detail !== undefined ? data.detail : data);
  return data;
}
