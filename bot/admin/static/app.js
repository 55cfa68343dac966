// Admin console: login, policy editor with line-located validation, versions/diff, publish and
// rollback (confirmed), try-it panel, live calls + today's rates (polling), softphone, audit log.

import { api, ApiError, token } from "./api.js";
import { renderDiff } from "./diff.js";
import { YamlEditor } from "./editor.js";
import { Recorder, Softphone } from "./media.js";

const $ = (sel) => document.querySelector(sel);
const RANK = { viewer: 0, editor: 1, publisher: 2 };

const state = {
  me: null,
  current: 0, // published version
  base: 0, // version the editor text started from (expected_version when publishing)
  draftId: null,
  draftRev: null, // revision of the draft this editor loaded or last saved (a save from elsewhere -> 409)
  versions: [],
  dirty: false,
  pollTimer: null,
  liveTimer: null,
  selectedCall: null,
};

let editor;

// ---------------------------------------------------------------- helpers
function toast(msg, kind = "info") {
  const el = $("#toast");
  el.textContent = msg;
  el.className = kind;
  el.hidden = false;
  clearTimeout(toast.t);
  toast.t = setTimeout(() => { el.hidden = true; }, kind === "error" ? 8000 : 4000);
}

function when(ts) {
  if (!ts) return "";
  const d = new Date(ts * 1000);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

function pct(x) { return x == null ? "–" : `${(x * 100).toFixed(1)}%`; }

function td(text, cls) {
  const c = document.createElement("td");
  c.textContent = text == null ? "" : String(text);
  if (cls) c.className = cls;
  return c;
}

function can(role) { return state.me && RANK[state.me.role] >= RANK[role]; }

function confirmDialog({ title, text, rows, labels, okLabel }) {
  const dlg = $("#confirm");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-comment").value = "";
  $("#confirm-ok").textContent = okLabel || "Confirm";
  const box = $("#confirm-diff");
  if (rows) renderDiff(box, rows, { labels }); else box.replaceChildren();
  dlg.returnValue = ""; // a dialog closed any other way than OK must never read as the last dialog's "ok"
  dlg.showModal();
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok" ? $("#confirm-comment").value : null), { once: true });
  });
}

function handleError(e, where) {
  if (e instanceof ApiError && e.status === 401) { logout("Your token was rejected; sign in again.", { keepEdits: true }); return; }
  const msg = e instanceof ApiError ? `${where}: ${e.message} (HTTP ${e.status})` : `${where}: ${e.message || e}`;
  toast(msg, "error");
}

// ---------------------------------------------------------------- login
async function login(t) {
  token.set(t);
  try {
    state.me = await api("/me");
  } catch (e) {
    token.clear();
    const el = $("#login-error");
    el.textContent = e instanceof ApiError && e.status === 401 ? "That token is not valid." : `Sign-in failed: ${e.message}`;
    el.hidden = false;
    return;
  }
  document.body.dataset.role = state.me.role;
  for (const el of document.querySelectorAll(".needs-editor")) el.disabled = !can("editor");
  for (const el of document.querySelectorAll(".needs-publisher")) el.hidden = !can("publisher");
  $("#yaml").readOnly = !can("editor");
  try {
    await refreshVersions();
    await loadCurrent();
    restoreUnsaved();
    showTab("policy");
  } finally {
    // Reveal the console only now: a tab picked while the policy was still loading would be
    // yanked back to "policy" above.
    $("#login").hidden = true;
    $("#app").hidden = false;
    $("#tabs").hidden = false;
    $("#logout").hidden = false;
    $("#who").textContent = `${state.me.name} · ${state.me.role}`;
    clearInterval(state.liveTimer);
    state.liveTimer = setInterval(watchLive, 5000);
  }
}

const UNSAVED = "voicebot.admin.unsaved";

// A rejected token (rotated, revoked) signs the admin out; the editor's unsaved text is kept in this tab and
// offered back after signing in again, instead of vanishing with the reload.
function logout(msg, { keepEdits = false } = {}) {
  if (state.dirty && keepEdits && editor) {
    sessionStorage.setItem(UNSAVED, JSON.stringify({ yaml: editor.value, base: state.base, draftId: state.draftId, draftRev: state.draftRev }));
  }
  token.clear();
  state.dirty = false;
  stopPolling();
  location.hash = "";
  if (msg) sessionStorage.setItem("voicebot.admin.msg", msg);
  location.reload();
}

function restoreUnsaved() {
  const raw = sessionStorage.getItem(UNSAVED);
  if (!raw) return;
  sessionStorage.removeItem(UNSAVED);
  let u;
  try { u = JSON.parse(raw); } catch { return; }
  if (!u || typeof u.yaml !== "string" || !can("editor")) return;
  editor.value = u.yaml;
  state.base = u.base || state.current;
  state.draftId = u.draftId || null;
  state.draftRev = u.draftRev ?? null;
  state.dirty = true;
  $("#editing").textContent = state.draftId
    ? `Editing draft ${state.draftId} (from v${state.base}) · unsaved changes restored`
    : `Editing a new draft from v${state.base} · unsaved changes restored`;
  toast("Your unsaved changes from before you were signed out are back in the editor; save them as a draft.", "ok");
  validate();
}

// ---------------------------------------------------------------- tabs
function showTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) {
    b.classList.toggle("active", b.dataset.tab === name);
    b.setAttribute("aria-selected", String(b.dataset.tab === name));
  }
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== `tab-${name}`;
  stopPolling();
  if (name === "versions") refreshVersions();
  if (name === "live") startPolling();
  if (name === "audit") loadAudit();
  if (name === "tryit" || name === "softphone") fillPolicyPickers();
}

function stopPolling() { clearInterval(state.pollTimer); state.pollTimer = null; }
function startPolling() { pollLive(); state.pollTimer = setInterval(pollLive, 2000); }

// ---------------------------------------------------------------- versions
async function refreshVersions() {
  const data = await api("/policies");
  state.current = data.current;
  state.versions = data.versions;
  $("#live-version").textContent = `live: v${data.current}`;
  // the try-it and softphone pickers offer the versions too: one published elsewhere (another admin) used to
  // be missing, and "(live)" stayed on the old one, until the admin switched tabs (the selection is kept)
  fillPolicyPickers();
  const tbody = $("#versions-table tbody");
  tbody.replaceChildren();
  for (const v of data.versions) {
    const tr = document.createElement("tr");
    tr.dataset.version = v.version;
    if (v.version === data.current) tr.className = "current";
    const actions = document.createElement("td");
    actions.className = "actions";
    const open = document.createElement("button");
    open.textContent = "Open";
    open.setAttribute("aria-label", `Open v${v.version} in the editor`);
    open.onclick = () => openVersion(v.version);
    const diff = document.createElement("button");
    diff.textContent = "Diff vs live";
    diff.setAttribute("aria-label", `Diff v${v.version} against the live version`);
    diff.onclick = () => { $("#diff-a").value = String(v.version); $("#diff-b").value = String(data.current); showDiff(); };
    actions.append(open, diff);
    if (v.version === data.current) {
      const b = document.createElement("span");
      b.className = "badge live";
      b.textContent = "live";
      actions.append(b);
    } else if (can("publisher")) {
      const rb = document.createElement("button");
      rb.className = "danger rollback";
      rb.textContent = "Roll back to this";
      rb.setAttribute("aria-label", `Roll back to v${v.version}`);
      rb.onclick = () => rollback(v.version);
      actions.append(rb);
    }
    tr.append(td(`v${v.version}`), td(v.author), td(when(v.created_at)), td(v.comment), actions);
    tbody.appendChild(tr);
  }
  // Compare defaults to "the version before the live one → live"; it used to default both sides to the newest
  // version (a select always has a value, so the old "no value yet" check never fired): "No differences".
  const defaults = [data.versions.find((v) => v.version !== data.current), { version: data.current }];
  [$("#diff-a"), $("#diff-b")].forEach((sel, i) => {
    const keep = sel.value;
    sel.replaceChildren(...data.versions.map((v) => new Option(`v${v.version}${v.version === data.current ? " (live)" : ""}`, String(v.version))));
    if (state.draftId) sel.append(new Option("editor draft", `draft:${state.draftId}`));
    if (keep && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
    else if (defaults[i]) sel.value = String(defaults[i].version);
  });
  return data;
}

async function showDiff() {
  const a = $("#diff-a").value, b = $("#diff-b").value;
  try {
    const d = await api(`/policies/diff?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
    const label = (x) => (x.startsWith("draft:") ? "editor draft" : `v${x}`);
    const n = renderDiff($("#diff"), d.rows, { labels: [label(a), label(b)] });
    $("#diff-summary").textContent = `${n} changed line${n === 1 ? "" : "s"}`;
  } catch (e) { handleError(e, "Diff"); }
}

async function openVersion(v) {
  if (state.dirty && !window.confirm("Discard the unsaved changes in the editor?")) return;
  let info;
  try { info = await api(`/policies/${v}`); } catch (e) { handleError(e, "Open"); return; }
  editor.value = info.yaml;
  state.base = state.current; // publishing this text replaces whatever is live now
  state.draftId = null;
  state.draftRev = null;
  state.dirty = false;
  $("#editing").textContent = `Editing a copy of v${v} (live is v${state.current})`;
  showTab("policy");
  validate();
}

async function rollback(v) {
  let d;
  try { d = await api(`/policies/diff?a=${state.current}&b=${v}`); } catch (e) { handleError(e, "Rollback"); return; }
  const comment = await confirmDialog({
    title: `Roll back to v${v}?`,
    text: `New calls will start with v${v} instead of v${state.current}. Calls in progress keep their version.`,
    rows: d.rows, labels: [`v${state.current} (live)`, `v${v}`], okLabel: `Roll back to v${v}`,
  });
  if (comment === null) return;
  try {
    await api("/rollback", { method: "POST", json: { version: v, expected_version: state.current, comment } });
    toast(`v${v} is live again.`, "ok");
  } catch (e) {
    if (e instanceof ApiError && e.status === 422) {
      toast(`v${v} no longer validates: ${e.errors.map((x) => `line ${x.line}: ${x.message}`).join("; ")}`, "error");
    } else if (e instanceof ApiError && e.status === 409) {
      toast(`Someone changed the live version meanwhile (now v${e.detail.current}). Review and try again.`, "error");
    } else handleError(e, "Rollback");
  }
  await refreshVersions();
}

// The "live: vN" badge (and the versions table) follow publishes and rollbacks made elsewhere: another
// tab, another admin, the API. Without this the badge kept showing the version live at sign-in.
async function watchLive() {
  if (!state.me || document.hidden) return;
  try {
    const data = await api("/policies");
    if (data.current !== state.current || data.versions.length !== state.versions.length) await refreshVersions();
  } catch (e) { if (e instanceof ApiError && e.status === 401) handleError(e, "Refresh"); }
}

// ---------------------------------------------------------------- editor
async function loadCurrent() {
  const info = await api(`/policies/${state.current}`);
  editor.value = info.yaml;
  state.base = state.current;
  state.draftId = null;
  state.draftRev = null;
  state.dirty = false;
  $("#editing").textContent = `Editing a new draft from v${state.current} (live)`;
  $("#valid-state").textContent = "";
  await listDrafts();
  validate();
}

async function listDrafts() {
  const drafts = await api("/drafts");
  const box = $("#drafts-box");
  box.replaceChildren();
  if (!drafts.length) return;
  box.append("Saved drafts: ");
  for (const d of drafts) {
    const a = document.createElement("button");
    a.className = "link";
    a.textContent = `${d.id} by ${d.author} (from v${d.base_version}, ${when(d.updated_at)})`;
    a.onclick = () => openDraft(d.id);
    box.append(a, " ");
  }
}

async function openDraft(id) {
  // Opening a draft replaced the editor's text without a word: the same question as every other way out.
  if (state.dirty && !window.confirm("Discard the unsaved changes in the editor?")) return;
  let d;
  try { d = await api(`/drafts/${encodeURIComponent(id)}`); } catch (e) { handleError(e, "Open draft"); return; }
  editor.value = d.yaml;
  state.base = d.base_version;
  state.draftId = id;
  state.draftRev = d.rev;
  state.dirty = false;
  $("#editing").textContent = `Editing draft ${id} (from v${d.base_version})`;
  validate();
}

function showErrors(errors) {
  editor.setErrors(errors);
  const ul = $("#errors");
  ul.replaceChildren();
  for (const e of errors) {
    const li = document.createElement("li");
    const where = document.createElement("button");
    where.className = "link";
    where.textContent = e.line ? `Line ${e.line}` : "Document";
    if (e.line) where.onclick = () => editor.goto(e.line);
    li.append(where, ` ${e.field || e.path ? `${e.field || e.path}: ` : ""}${e.message}`);
    ul.appendChild(li);
  }
  const st = $("#valid-state");
  st.textContent = errors.length ? `✗ ${errors.length} error${errors.length > 1 ? "s" : ""}` : "✓ valid";
  st.className = `state ${errors.length ? "bad" : "good"}`;
}

let validateSeq = 0;
async function validate() {
  if (!can("editor")) return true;
  const seq = ++validateSeq;
  try {
    const r = await api("/validate", { method: "POST", json: { yaml: editor.value } });
    if (seq === validateSeq) showErrors(r.errors);
    return r.valid;
  } catch (e) { handleError(e, "Validate"); return false; }
}

// Saves the editor's text; never overwrites a save made meanwhile in another tab or by another admin
// (409) and never loses the text when the draft was published or deleted meanwhile (404): in both
// cases the text becomes a new draft. Returns false when the caller should stop (e.g. not publish).
async function saveDraft() {
  let note = null;
  try {
    let d;
    if (state.draftId) {
      try {
        d = await api(`/drafts/${state.draftId}`, { method: "PUT", json: { yaml: editor.value, rev: state.draftRev } });
      } catch (e) {
        if (!(e instanceof ApiError && (e.status === 409 || e.status === 404))) throw e;
        const old = state.draftId;
        d = await api("/drafts", { method: "POST", json: { yaml: editor.value, base_version: state.base, comment: `your copy of draft ${old}` } });
        note = e.status === 409
          ? `Draft ${old} was saved by someone else while you edited it. Nothing was overwritten: your text is saved as new draft ${d.id}; compare the two on the Versions tab.`
          : `Draft ${old} was published or deleted while you edited it. Your text is saved as new draft ${d.id}.`;
      }
    } else {
      d = await api("/drafts", { method: "POST", json: { yaml: editor.value, base_version: state.base } });
    }
    state.draftId = d.id;
    state.draftRev = d.rev;
    state.dirty = false;
    $("#editing").textContent = `Editing draft ${state.draftId} (from v${state.base})`;
    if (note) toast(note, "error"); else toast(`Draft ${state.draftId} saved.`, "ok");
    await listDrafts();
    await refreshVersions(); // the diff pickers offer this draft
    return note === null;
  } catch (e) { handleError(e, "Save"); return false; }
}

async function publish() {
  if (!(await validate())) { toast("Fix the errors marked in the editor before publishing.", "error"); return; }
  if (!(await saveDraft())) return;
  let d;
  try { d = await api(`/policies/diff?a=${state.base}&b=draft:${state.draftId}`); } catch (e) { handleError(e, "Publish"); return; }
  const comment = await confirmDialog({
    title: `Publish as v${Math.max(...state.versions.map((v) => v.version), 0) + 1}?`,
    text: `Every worker switches to it within a second; calls in progress keep their version. Changes against v${state.base}:`,
    rows: d.rows, labels: [`v${state.base}`, "draft"], okLabel: "Publish",
  });
  if (comment === null) return;
  try {
    const r = await api("/publish", { method: "POST", json: { draft_id: state.draftId, draft_rev: state.draftRev, expected_version: state.base, comment } });
    toast(`Published v${r.version}. New calls use it now.`, "ok");
    await refreshVersions();
    await loadCurrent();
  } catch (e) {
    if (e instanceof ApiError && e.status === 409 && e.detail.current_rev !== undefined) {
      toast(`Draft ${state.draftId} was saved again (elsewhere) after you reviewed it; nothing was published. Open it again to review the latest text.`, "error");
      await listDrafts();
    } else if (e instanceof ApiError && e.status === 409) {
      toast(`Publish conflict: v${e.detail.current} was published while you edited (you started from v${e.detail.expected}). Your draft ${state.draftId} is saved; open Versions to compare, then publish again.`, "error");
      // The next publish is checked against what is live now; its confirm dialog diffs the draft
      // against that version, so the other admin's changes show up before anything is replaced.
      state.base = e.detail.current;
      $("#editing").textContent = `Editing draft ${state.draftId} (now compared with live v${state.base})`;
      await refreshVersions();
    } else if (e instanceof ApiError && e.status === 422) {
      showErrors(e.errors);
      toast("The policy does not validate: see the marked lines.", "error");
    } else handleError(e, "Publish");
  }
}

// ---------------------------------------------------------------- try it
function fillPolicyPickers() {
  for (const sel of document.querySelectorAll(".policy-pick")) {
    const keep = sel.value;
    sel.replaceChildren(
      new Option("Editor text (unsaved draft)", "editor"),
      ...state.versions.map((v) => new Option(`v${v.version}${v.version === state.current ? " (live)" : ""}`, `v${v.version}`)),
    );
    sel.value = keep && [...sel.options].some((o) => o.value === keep) ? keep : "editor";
  }
}

function policyRef(sel) {
  const v = sel.value;
  if (v === "editor") return { yaml: editor.value };
  return { version: Number(v.slice(1)) };
}

async function simulate(form) {
  const ref = policyRef($("#try-policy"));
  if (ref.yaml) form.append("yaml", ref.yaml); else form.append("version", String(ref.version));
  $("#try-status").textContent = "Running…";
  try {
    const r = await api("/simulate", { method: "POST", form });
    showResult(r);
    $("#try-status").textContent = "";
  } catch (e) {
    $("#try-status").textContent = "";
    if (e instanceof ApiError && e.status === 422 && e.errors.length) {
      toast("The editor's policy does not validate; fix it on the Policy tab.", "error");
      showErrors(e.errors);
    } else handleError(e, "Try it");
  }
}

function showResult(r) {
  const u = r.understanding, d = r.decision;
  $("#try-result").hidden = false;
  $("#try-source").textContent = `${r.input === "text" ? "Spoken by the bot's voice" : "Your recording"} · ${r.audio_seconds}s audio · policy ${r.policy} · understood in ${r.timings.understand_ms} ms`;
  $("#r-transcript").textContent = u.transcript || "(empty)";
  $("#r-intent").textContent = u.intent || "(none: slots only)";
  $("#r-conf").textContent = `confidence ${(u.confidence * 100).toFixed(1)}%${u.error ? ` · ${u.error}` : ""}`;
  const alts = $("#r-alts tbody");
  alts.replaceChildren(...u.alternatives.map(([name, p]) => {
    const tr = document.createElement("tr");
    const bar = document.createElement("td");
    const m = document.createElement("meter");
    m.min = 0; m.max = 1; m.value = p;
    bar.appendChild(m);
    tr.append(td(name || "(none)"), bar, td(`${(p * 100).toFixed(1)}%`));
    return tr;
  }));
  const slots = Object.entries(u.slots || {});
  $("#r-slots").textContent = slots.length ? slots.map(([k, v]) => `${k} = ${v}`).join(", ") : "none";
  $("#r-action").textContent = d.action;
  $("#r-action").className = `badge action-${d.action}`;
  $("#r-reason").textContent = `reason: ${d.reason}${d.target ? ` · queue ${d.target}` : ""}`;
  $("#r-prompt").textContent = d.prompt || "(nothing)";
}

let recorder = null;
async function toggleRecord() {
  const btn = $("#btn-record");
  if (!recorder) {
    try {
      recorder = new Recorder();
      await recorder.start();
      btn.textContent = "■ Stop";
      btn.classList.add("danger");
    } catch (e) { recorder = null; handleError(e, "Microphone"); }
    return;
  }
  const blob = await recorder.stop();
  recorder = null;
  btn.textContent = "● Record";
  btn.classList.remove("danger");
  const form = new FormData();
  form.append("audio", blob, "recording.wav");
  await simulate(form);
}

// ---------------------------------------------------------------- live
async function pollLive() {
  try {
    const [stats, calls] = await Promise.all([api("/stats/today"), api("/calls")]);
    $("#s-automation").textContent = pct(stats.automation_rate);
    $("#s-clarification").textContent = pct(stats.clarification_rate);
    $("#s-escalation").textContent = pct(stats.escalation_rate);
    $("#s-calls").textContent = String(stats.calls);
    const tbody = $("#calls-table tbody");
    // The rows are rebuilt every 2 s: keep keyboard focus on the call it was on.
    const focused = document.activeElement && document.activeElement.closest && document.activeElement.closest("#calls-table tr");
    const focusedId = focused ? focused.dataset.callId : null;
    tbody.replaceChildren(...calls.calls.map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.callId = c.call_id;
      tr.className = "clickable" + (c.call_id === state.selectedCall ? " selected" : "");
      tr.tabIndex = 0; // keyboard: Tab to a call, Enter or Space shows its events
      tr.setAttribute("aria-label", `Show the events of call ${c.call_id}`);
      tr.onclick = () => { state.selectedCall = c.call_id; pollLive(); };
      tr.onkeydown = (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); tr.onclick(); } };
      tr.append(td(c.call_id, "mono"), td(c.transport), td(c.caller), td(c.policy_version), td(`${Math.round(c.duration_s)} s`), td(c.worker), td(c.events));
      return tr;
    }));
    if (!calls.calls.length) {
      const tr = document.createElement("tr");
      const c = td("No calls in progress.", "muted");
      c.colSpan = 7;
      tr.appendChild(c);
      tbody.appendChild(tr);
    }
    if (focusedId) for (const tr of tbody.rows) if (tr.dataset.callId === focusedId) tr.focus();
    $("#live-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    if (state.selectedCall) await showCall(state.selectedCall);
  } catch (e) { handleError(e, "Live view"); stopPolling(); }
}

async function showCall(id, target = $("#cd-events tbody")) {
  let data;
  try { data = await api(`/calls/${encodeURIComponent(id)}`); } catch (e) { if (e.status === 404) return null; throw e; }
  if (target.closest("#call-detail")) { $("#call-detail").hidden = false; $("#cd-id").textContent = id; }
  target.replaceChildren(...data.events.map((ev) => {
    const tr = document.createElement("tr");
    const { id: _i, type, t, ...rest } = ev;
    let detail = "";
    if (type === "turn" && rest.error) {
      detail = `not understood (${rest.error}) → ${rest.decision?.action} (${rest.decision?.reason})`;
    } else if (type === "turn") {
      detail = `${rest.intent || "–"} ${(rest.confidence * 100).toFixed(0)}% → ${rest.decision?.action} (${rest.decision?.reason})${rest.transcript ? ` “${rest.transcript}”` : ""}`;
    } else if (type === "prompt_heard") detail = rest.text || "";
    else detail = JSON.stringify(rest).slice(0, 160);
    tr.append(td(new Date(t * 1000).toLocaleTimeString()), td(type), td(detail));
    return tr;
  }));
  return data;
}

// ---------------------------------------------------------------- softphone
let phone = null;
let phonePoll = null;
let phonePollUntil = Infinity; // after the line closes, poll a little longer for the record's outcome, then stop
function spStopPolling() {
  clearInterval(phonePoll);
  phonePoll = null;
}
async function spCall() {
  spStopPolling(); // a previous call's poll must not run on (and pile up) under the new one
  phonePollUntil = Infinity;
  $("#sp-call").disabled = true;
  $("#sp-hangup").disabled = false;
  $("#sp-keys").textContent = "–";
  phone = new Softphone({
    audioEl: $("#sp-audio"),
    onState: (s) => {
      $("#sp-status").textContent = s;
      if (["failed", "closed", "disconnected", "ended"].includes(s)) spEnded();
    },
    onKeyError: (msg) => toast(`Keypad: ${msg}`, "error"),
    onKeypad: spKeypad,
  });
  window.voicebotSoftphone = phone; // lets tests and curious admins read pc.getStats()
  try {
    const id = await phone.call(policyRef($("#sp-policy")));
    $("#sp-callid").textContent = id;
    phonePoll = setInterval(() => spEvents(id), 1000);
    // hung up while the offer was in flight: the line is already closed, poll only for the record's outcome
    if (phone.ended && phonePollUntil === Infinity) phonePollUntil = Date.now() + 30000;
  } catch (e) {
    // hung up before the offer went out: the admin's own doing, not an error to show
    if (!phone.ended) handleError(e, "Softphone");
    phone.hangup();
  }
}

// how a leg ends when its worker (or the browser's network) went away: the softphone may carry the call on
const LOST_OUTCOMES = ["worker_lost", "disconnected", "error:exception", "abandoned"];

async function spEvents(id) {
  try {
    const data = await api(`/calls/${encodeURIComponent(id)}`);
    const ol = $("#sp-events");
    ol.replaceChildren(...data.events.filter((e) => ["turn", "dtmf", "prompt_heard", "transfer", "connect_failed", "call_ended", "call_started", "call_resumed", "resume_failed"].includes(e.type)).map((e) => {
      const li = document.createElement("li");
      li.dataset.type = e.type;
      if (e.type === "dtmf") li.textContent = `you pressed ${e.digit}`;
      else if (e.type === "connect_failed" && e.reason === "hangup") li.textContent = `you hung up before the call connected (after ${e.waited_s} s)`;
      else if (e.type === "connect_failed") li.textContent = `the call never connected (${e.reason}, after ${e.waited_s} s): check the network path (ICE) or BOT_WEBRTC_ICE_SERVERS`;
      else if (e.type === "turn" && e.error) li.textContent = `you: (not understood: ${e.error}) → ${e.decision?.action}`;
      else if (e.type === "turn") li.textContent = `you: “${e.transcript || ""}” → ${e.intent || "–"} (${(e.confidence * 100).toFixed(0)}%) → ${e.decision?.action}: ${e.decision?.prompt || ""}`;
      else if (e.type === "prompt_heard") li.textContent = `bot: ${e.text}`;
      else if (e.type === "call_resumed") li.textContent = `carried on by another worker (leg ${e.leg})`;
      else if (e.type === "resume_failed") li.textContent = `reconnecting: the new connection (leg ${e.leg}) never connected (${e.reason}, after ${e.waited_s} s), trying again`;
      // a browser is not on the phone network: the transfer the policy chose is shown, not completed
      else if (e.type === "transfer") li.textContent = `transfer to ${e.target}: ${e.ok ? "done" : "not possible from a browser call (the policy's choice is what to check)"}`;
      else li.textContent = `${e.type}${e.outcome ? `: ${e.outcome}` : ""}${e.policy_version ? ` (policy ${e.policy_version})` : ""}`;
      return li;
    }));
    // a call lost with its worker reads "ended" until the console's new peer connection carries it on
    const lost = data.record && LOST_OUTCOMES.includes(data.record.outcome) && phone && !phone.ended;
    if (data.record && data.record.status === "ended" && !lost) { spStopPolling(); $("#sp-status").textContent = `ended: ${data.record.outcome}`; spEnded(); }
  } catch (e) { if (!(e instanceof ApiError && e.status === 404)) handleError(e, "Softphone events"); }
  // a call whose offer never got an answer has no record: its 404s must not be polled forever
  if (Date.now() > phonePollUntil) spStopPolling();
}

// keypad buttons work only while media flows (the data channel is up with the call)
function spKeypad(on) {
  for (const b of document.querySelectorAll("#sp-keypad button")) b.disabled = !on;
}

function spKey(key) {
  if (!phone) return;
  try {
    phone.sendKeys(key);
    const el = $("#sp-keys");
    el.textContent = (el.textContent === "–" ? "" : el.textContent) + key;
  } catch (e) { handleError(e, "Keypad"); }
}

function spEnded() {
  spKeypad(false);
  $("#sp-call").disabled = false;
  $("#sp-hangup").disabled = true;
  // a call that never connected gets its record (error:connect_timeout) only when the bot's 20 s connect
  // timeout runs out: keep polling past that, so the page can say so
  if (phonePoll !== null && phonePollUntil === Infinity) phonePollUntil = Date.now() + 30000;
}

// ---------------------------------------------------------------- audit
async function loadAudit() {
  try {
    const rows = await api("/audit?count=200");
    $("#audit-table tbody").replaceChildren(...rows.map((r) => {
      const tr = document.createElement("tr");
      tr.append(td(when(r.ts)), td(r.actor), td(r.role), td(r.ip), td(r.action),
        td(r.from ? `v${r.from} → v${r.version}` : r.version ? `v${r.version}` : r.draft ? `draft ${r.draft}` : ""), td(r.detail));
      return tr;
    }));
  } catch (e) { handleError(e, "Audit"); }
}

// ---------------------------------------------------------------- wiring
function init() {
  editor = new YamlEditor($("#yaml"), $("#gutter"), $("#marks"));
  let timer;
  $("#yaml").addEventListener("input", () => {
    state.dirty = true;
    clearTimeout(timer);
    timer = setTimeout(validate, 700);
  });
  $("#login-form").addEventListener("submit", (e) => { e.preventDefault(); login($("#token").value.trim()); });
  $("#logout").onclick = () => {
    if (state.dirty && !window.confirm("Sign out and discard the unsaved changes in the editor?")) return;
    logout();
  };
  for (const b of document.querySelectorAll("#tabs button")) b.onclick = () => showTab(b.dataset.tab);
  $("#btn-validate").onclick = validate;
  $("#btn-save").onclick = saveDraft;
  $("#btn-publish").onclick = publish;
  $("#btn-revert").onclick = async () => {
    if (state.dirty && !window.confirm("Discard the unsaved changes in the editor?")) return;
    await refreshVersions();
    await loadCurrent();
  };
  $("#btn-diff").onclick = showDiff;
  $("#try-text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("#try-text").value.trim();
    if (!text) return;
    const f = new FormData();
    f.append("text", text);
    simulate(f);
  });
  $("#try-file-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const file = $("#try-file").files[0];
    if (!file) { toast("Choose a WAV file first.", "error"); return; }
    const f = new FormData();
    f.append("audio", file, file.name);
    simulate(f);
  });
  $("#btn-record").onclick = toggleRecord;
  $("#sp-call").onclick = spCall;
  $("#sp-hangup").onclick = () => { if (phone) phone.hangup(); };
  for (const b of document.querySelectorAll("#sp-keypad button")) b.onclick = () => spKey(b.dataset.key);
  window.addEventListener("beforeunload", (e) => { if (state.dirty) { e.preventDefault(); e.returnValue = ""; } });

  const msg = sessionStorage.getItem("voicebot.admin.msg");
  if (msg) { sessionStorage.removeItem("voicebot.admin.msg"); const el = $("#login-error"); el.textContent = msg; el.hidden = false; }
  if (token.get()) login(token.get());
}

init();
