// dspex-tasks console: the public HTTP API only (same calls as any other client).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { sessionId: null, watch: null, versions: new Map() };

function token() {
  return $("#token").value.trim();
}

function headers(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || "HTTP " + status);
    this.status = status;
    this.code = error.code || "http_" + status;
  }
}

async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const reply = await fetch(path, init);
  const data = await reply.json().catch(() => ({}));
  if (!reply.ok) throw new ApiError(reply.status, data.error || {});
  return data;
}

function say(el, text, isError) {
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

function describe(err) {
  return err instanceof ApiError ? err.code + ": " + err.message : String(err);
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header).
// Calls onOpen() once the server answered, onEvent({id, event, data}) per event; resolves
// with the last event id when the stream ends.
async function readEvents(path, lastId, signal, onOpen, onEvent) {
  const h = headers({ Accept: "text/event-stream" });
  if (lastId) h["Last-Event-ID"] = lastId;
  const reply = await fetch(path, { headers: h, signal });
  if (!reply.ok) {
    const data = await reply.json().catch(() => ({}));
    throw new ApiError(reply.status, data.error || {});
  }
  onOpen();
  const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return lastId;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const ev = { id: null, event: "message", data: "" };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (name === "id") ev.id = val;
        else if (name === "event") ev.event = val;
        else if (name === "data") ev.data += (ev.data ? "\n" : "") + val;
      }
      if (!ev.data && ev.id === null) continue;
      if (ev.id) lastId = ev.id;
      ev.data = ev.data ? JSON.parse(ev.data) : {};
      if (onEvent(ev) === false) return lastId;
    }
  }
}

// --- the session and its variables -------------------------------------------------------

function showValue(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

function setVariable(v) {
  const known = state.versions.get(v.name);
  if (known !== undefined && known >= v.version) return; // an older event than the list
  state.versions.set(v.name, v.version);
  const body = $("#variables tbody");
  let row = body.querySelector(`tr[data-name="${CSS.escape(v.name)}"]`);
  if (!row) {
    row = document.createElement("tr");
    row.dataset.name = v.name;
    for (const cls of ["name", "type", "value", "version"]) {
      const td = document.createElement("td");
      td.className = cls;
      row.appendChild(td);
    }
    body.appendChild(row);
  }
  row.querySelector(".name").textContent = v.name;
  row.querySelector(".type").textContent = v.type;
  row.querySelector(".value").textContent = showValue(v.value);
  row.querySelector(".version").textContent = String(v.version);
  row.classList.remove("changed");
  void row.offsetWidth; // restart the highlight
  row.classList.add("changed");
}

function removeVariable(name) {
  state.versions.delete(name);
  const row = $("#variables tbody").querySelector(`tr[data-name="${CSS.escape(name)}"]`);
  if (row) row.remove();
}

function onSessionEvent(ev) {
  if (ev.event === "variable.deleted") removeVariable(ev.data.name);
  else if (ev.event.startsWith("variable.")) setVariable(ev.data);
  else if (ev.event === "error") say($("#session-status"), describe(new ApiError(0, ev.data)), true);
}

// Watch the session's events from now, then read its variables: the stream's start is
// fixed before the list is read, so no write falls between the two.
async function watchSession(sid) {
  if (state.watch) state.watch.abort();
  const watch = new AbortController();
  state.watch = watch;
  const badge = $("#events-state");
  let lastId = null;
  let listed = false;
  while (!watch.signal.aborted) {
    try {
      lastId = await readEvents(
        `/v1/sessions/${encodeURIComponent(sid)}/events`,
        lastId,
        watch.signal,
        () => {
          badge.textContent = "live";
          badge.classList.add("live");
          if (!listed) {
            listed = true;
            loadVariables(sid);
          }
        },
        onSessionEvent,
      );
    } catch (err) {
      if (watch.signal.aborted) return;
      say($("#session-status"), describe(err), true);
      if (err instanceof ApiError && err.status < 500) break; // gone or refused: stop
    }
    badge.textContent = "reconnecting";
    badge.classList.remove("live");
    await new Promise((r) => setTimeout(r, 1000));
  }
  badge.textContent = "not watching";
  badge.classList.remove("live");
}

async function loadVariables(sid) {
  try {
    const { variables } = await api("GET", `/v1/sessions/${encodeURIComponent(sid)}/variables`);
    variables.forEach(setVariable);
  } catch (err) {
    say($("#session-status"), describe(err), true);
  }
}

async function openSession(create) {
  const sid = $("#session-id").value.trim();
  if (!sid) return;
  const status = $("#session-status");
  try {
    const session = create
      ? await api("POST", "/v1/sessions", { session_id: sid })
      : await api("GET", `/v1/sessions/${encodeURIComponent(sid)}`);
    state.sessionId = session.id;
    state.versions.clear();
    $("#variables tbody").replaceChildren();
    say(status, `session ${session.id}, expires ${session.expires_at}`);
    watchSession(session.id);
  } catch (err) {
    say(status, describe(err), true);
  }
}

async function listSessions() {
  try {
    const { sessions } = await api("GET", "/v1/sessions");
    $("#session-list").replaceChildren(
      ...sessions.map((s) => Object.assign(document.createElement("option"), { value: s })),
    );
    say($("#session-status"), `${sessions.length} sessions`);
  } catch (err) {
    say($("#session-status"), describe(err), true);
  }
}

// --- a streamed run --------------------------------------------------------------------

function fieldBox(name) {
  let box = $("#run-fields").querySelector(`pre[data-field="${CSS.escape(name)}"]`);
  if (!box) {
    const wrap = document.createElement("div");
    wrap.className = "field";
    const title = document.createElement("h4");
    title.textContent = name;
    box = document.createElement("pre");
    box.dataset.field = name;
    wrap.append(title, box);
    $("#run-fields").appendChild(wrap);
  }
  return box;
}

async function startRun(event) {
  event.preventDefault();
  const status = $("#run-status");
  if (!state.sessionId) return say(status, "open a session first", true);
  let inputs;
  try {
    inputs = JSON.parse($("#run-inputs").value || "{}");
  } catch (err) {
    return say(status, "inputs are not JSON: " + err.message, true);
  }
  $("#run-fields").replaceChildren();
  $("#run-start").disabled = true;
  try {
    const { run_id } = await api("POST", `/v1/sessions/${encodeURIComponent(state.sessionId)}/runs`, {
      task: $("#run-task").value,
      signature: $("#run-signature").value,
      inputs,
      options: { stream: true },
    });
    status.dataset.runId = run_id;
    say(status, `run ${run_id}: running`);
    let ended = false;
    let lastId = null;
    while (!ended) {
      lastId = await readEvents(`/v1/runs/${run_id}/stream`, lastId, undefined, () => {}, (ev) => {
        if (ev.event === "token") fieldBox(ev.data.field).textContent += ev.data.delta;
        else if (ev.event === "output") fieldBox(ev.data.field).textContent = showValue(ev.data.value);
        else if (ev.event === "status") say(status, `run ${run_id}: ${ev.data.step}`);
        else if (ev.event === "done") {
          for (const [name, value] of Object.entries(ev.data.outputs || {})) fieldBox(name).textContent = showValue(value);
          say(status, `run ${run_id}: done`);
          ended = true;
          return false;
        } else if (ev.event === "error") {
          say(status, `run ${run_id}: ${describe(new ApiError(0, ev.data))}`, true);
          ended = true;
          return false;
        }
        return true;
      });
      if (!ended) {
        const run = await api("GET", `/v1/runs/${run_id}`);
        if (!["queued", "running"].includes(run.status)) {
          say(status, `run ${run_id}: ${run.status}`, Boolean(run.error));
          ended = true;
        }
      }
    }
  } catch (err) {
    say(status, describe(err), true);
  } finally {
    $("#run-start").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#token").value = sessionStorage.getItem("dspex-token") || "";
  $("#token").addEventListener("change", () => sessionStorage.setItem("dspex-token", token()));
  $("#session-form").addEventListener("submit", (e) => {
    e.preventDefault();
    openSession(false);
  });
  $("#session-create").addEventListener("click", () => openSession(true));
  $("#session-refresh").addEventListener("click", listSessions);
  $("#run-form").addEventListener("submit", startRun);
});
