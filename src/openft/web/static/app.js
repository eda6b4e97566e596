// The openft dashboard. It calls only the public /v1 API with the user's key, exactly as the
// SDK and the CLI do (plus two documented openft extensions under /v1: a job's per-step
// metrics and a file's validation report). The key lives in sessionStorage: it is gone when the
// browser tab closes, and it is never written to localStorage or a cookie.
import { drawChart, legend } from "./chart.js";

const $ = (sel) => document.querySelector(sel);
const KEY_SLOT = "openft-key";
let key = sessionStorage.getItem(KEY_SLOT) || "";
const TERMINAL = ["succeeded", "failed", "cancelled"];

// ---------------------------------------------------------------- API

class ApiError extends Error {}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: "Bearer " + key };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch("/v1" + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(data.error ? data.error.message : `${resp.status} ${resp.statusText}`);
  return data;
}

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "testid") node.dataset.testid = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c != null) node.append(c instanceof Node ? c : String(c));
  return node;
}

const time = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const clock = (t) => new Date(t * 1000).toLocaleTimeString();
const num = (v, digits = 4) => (v == null ? "–" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(digits)) : String(v));

function say(message, kind = "") {
  $("#status").textContent = message || "";
  $("#status").className = kind;
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = h("textarea", {}, text);
    document.body.append(area); area.select(); document.execCommand("copy"); area.remove();
  }
  const old = button.textContent;
  button.textContent = "Copied"; setTimeout(() => (button.textContent = old), 1200);
}

// ---------------------------------------------------------------- key

function showKey() {
  $("#key-form").hidden = !!key;
  $("#key-forget").hidden = !key;
  $("#key-info").hidden = !key;
  // The prefix is what `openft keys list` prints, so a user can tell which key this tab uses.
  $("#key-info").textContent = key ? `key ${key.slice(0, 14)}…` : "";
  $("#key-info").title = "Kept for this browser tab only (sessionStorage)";
}

$("#key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const candidate = $("#api-key").value.trim();
  if (!candidate) return;
  key = candidate;
  try {
    await api("/models");
  } catch (err) {
    key = "";
    say(err.message, "error");
    return;
  }
  sessionStorage.setItem(KEY_SLOT, key);
  $("#api-key").value = "";
  showKey();
  say("");
  route();
});

$("#key-forget").addEventListener("click", () => {
  key = ""; sessionStorage.removeItem(KEY_SLOT); showKey(); route();
});

// ---------------------------------------------------------------- routing

function parseHash() {
  const [path, query] = (location.hash.replace(/^#\/?/, "") || "jobs").split("?");
  const [view, ...rest] = path.split("/");
  return { view, id: rest.length ? decodeURIComponent(rest.join("/")) : null, params: new URLSearchParams(query || "") };
}

let current = { view: null, id: null };

function route() {
  const { view, id, params } = parseHash();
  for (const v of ["jobs", "files", "playground"]) {
    $(`#view-${v}`).hidden = v !== view;
    document.querySelector(`[data-nav=${v}]`).classList.toggle("active", v === view);
  }
  if (!key) { say("Enter an API key to see your project (create one with: openft keys create --project NAME)."); return; }
  const changed = current.view !== view || current.id !== id;
  current = { view, id };
  if (view === "jobs") { if (changed) openJob(id); refreshJobs(); }
  else if (view === "files") { refreshFiles(); if (changed) openFile(id); }
  else if (view === "playground") openPlayground(params.get("model"));
}
window.addEventListener("hashchange", route);

// ---------------------------------------------------------------- jobs list

let jobsCursor = null; // last id of the oldest page loaded ("Older jobs")
let extraJobs = [];

function jobRow(job) {
  const suffix = job.user_provided_suffix ? ` · ${job.user_provided_suffix}` : "";
  return h("li", { testid: "job-row", class: job.id === current.id ? "selected" : "", "data-id": job.id, onclick: () => (location.hash = `#/jobs/${job.id}`) },
    h("div", { class: "row1" }, h("span", { class: `dot st-${job.status}` }), h("span", { class: "mono" }, job.id)),
    h("div", { class: "row2" }, `${job.status} · ${job.model}${suffix}`),
    h("div", { class: "row2 muted" }, time(job.created_at)));
}

async function refreshJobs() {
  try {
    const page = await api("/fine_tuning/jobs?limit=30");
    if (jobsCursor === null && page.has_more) jobsCursor = page.data[page.data.length - 1].id;
    $("#jobs-more").hidden = jobsCursor === null;
    const seen = new Set(page.data.map((j) => j.id));
    $("#jobs").replaceChildren(...page.data.map(jobRow), ...extraJobs.filter((j) => !seen.has(j.id)).map(jobRow));
    if (!page.data.length) $("#jobs").append(h("li", { class: "muted" }, "No jobs yet."));
    say("");
  } catch (err) { say(err.message, "error"); }
}

$("#jobs-more").addEventListener("click", async () => {
  const page = await api(`/fine_tuning/jobs?limit=30&after=${jobsCursor}`);
  extraJobs.push(...page.data);
  jobsCursor = page.has_more ? page.data[page.data.length - 1].id : null;
  refreshJobs();
});

// ---------------------------------------------------------------- one job

let job = null; // { id, data, rows, events: [], eventIds: Set, olderCursor, loading }

function openJob(id) {
  job = id ? { id, data: null, rows: [], events: [], eventIds: new Set(), olderCursor: undefined } : null;
  $("#job-empty").hidden = !!id;
  $("#job-body").hidden = !id;
  $("#job-events").replaceChildren();
  $("#chart-wrap").replaceChildren();
  $("#job-checkpoints tbody").replaceChildren();
  if (id) refreshJob();
}

async function refreshJob() {
  if (!job || job.loading) return;
  const mine = job;
  mine.loading = true;
  try {
    const [data] = await Promise.all([api(`/fine_tuning/jobs/${mine.id}`), loadMetrics(mine), loadEvents(mine)]);
    if (job !== mine) return;
    mine.data = data;
    renderJob(mine);
    await loadCheckpoints(mine);
  } catch (err) {
    say(err.message, "error");
  } finally {
    mine.loading = false;
  }
}

async function loadMetrics(j) {
  // All steps, incrementally: only those after the last one already drawn.
  const last = j.rows.length ? j.rows[j.rows.length - 1].step : 0;
  const page = await api(`/fine_tuning/jobs/${j.id}/metrics?after_step=${last}`);
  if (page.data.length || !j.drawn) {
    j.rows.push(...page.data);
    j.drawn = true;
    const total = j.rows.length ? j.rows[j.rows.length - 1].total_steps : 0;
    drawChart($("#chart-wrap"), j.rows, total);
    legend($("#chart-legend"));
  }
}

function eventItem(e) {
  return h("li", { class: `level-${e.level} type-${e.type}` },
    h("time", {}, clock(e.created_at)), " ", e.message);
}

async function loadEvents(j) {
  // Newest first: read pages until an event already shown, so a burst of events is never lost.
  const fresh = [];
  let after = null;
  for (;;) {
    const page = await api(`/fine_tuning/jobs/${j.id}/events?limit=100${after ? `&after=${after}` : ""}`);
    const stop = page.data.findIndex((e) => j.eventIds.has(e.id));
    fresh.push(...(stop < 0 ? page.data : page.data.slice(0, stop)));
    if (j.olderCursor === undefined) { // first load: remember where older pages start
      j.olderCursor = page.has_more ? page.data[page.data.length - 1].id : null;
      break;
    }
    if (stop >= 0 || !page.has_more) break;
    after = page.data[page.data.length - 1].id;
  }
  if (job !== j || !fresh.length) return;
  for (const e of fresh) j.eventIds.add(e.id);
  j.events.unshift(...fresh);
  $("#job-events").prepend(...fresh.map(eventItem));
  $("#events-more").hidden = !j.olderCursor;
  $("#events-count").textContent = `(${j.events.length}${j.olderCursor ? "+" : ""})`;
}

$("#events-more").addEventListener("click", async () => {
  const j = job;
  if (!j || !j.olderCursor) return;
  const page = await api(`/fine_tuning/jobs/${j.id}/events?limit=100&after=${j.olderCursor}`);
  const older = page.data.filter((e) => !j.eventIds.has(e.id));
  for (const e of older) j.eventIds.add(e.id);
  j.events.push(...older);
  $("#job-events").append(...older.map(eventItem));
  j.olderCursor = page.has_more ? page.data[page.data.length - 1].id : null;
  $("#events-more").hidden = !j.olderCursor;
  $("#events-count").textContent = `(${j.events.length}${j.olderCursor ? "+" : ""})`;
});

function renderJob(j) {
  const d = j.data;
  $("#job-id").textContent = d.id;
  $("#job-model").textContent = d.model;
  const ft = $("#job-ft-model");
  ft.replaceChildren();
  if (d.fine_tuned_model) {
    ft.append("→ ", d.fine_tuned_model, " ",
      h("button", { class: "small", onclick: (ev) => copy(d.fine_tuned_model, ev.target) }, "Copy"), " ",
      h("a", { class: "button small", href: `#/playground?model=${encodeURIComponent(d.fine_tuned_model)}` }, "Playground"));
  }
  const status = $("#job-status");
  status.textContent = d.status;
  status.className = `badge st-${d.status}`;
  $("#job-pause").disabled = !["queued", "running"].includes(d.status);
  $("#job-resume").disabled = d.status !== "paused";
  $("#job-cancel").disabled = TERMINAL.includes(d.status);
  $("#job-error").hidden = !d.error;
  if (d.error) $("#job-error").textContent = `${d.error.code}: ${d.error.message}`;
  renderProgress(j);
  renderHyperparameters(d);
}

function renderProgress(j) {
  const d = j.data;
  const last = j.rows[j.rows.length - 1];
  const step = last ? last.step : 0;
  const total = last ? last.total_steps : null;
  const pct = total ? Math.min(100, (100 * step) / total) : d.status === "succeeded" ? 100 : 0;
  $("#job-progress-fill").style.width = `${pct}%`;
  $("#job-progress-fill").className = `st-${d.status}`;
  let text = total ? `Step ${step} of ${total}` : d.status === "validating_files" ? "Validating files…" : d.status === "queued" ? "Queued" : "No steps yet";
  if (d.status === "running" && d.estimated_finish) {
    const left = Math.max(0, d.estimated_finish - Date.now() / 1000);
    text += ` · ETA ${clock(d.estimated_finish)} (${left < 90 ? `${Math.round(left)} s` : `${Math.round(left / 60)} min`} left)`;
  } else if (d.finished_at) {
    text += ` · ${d.status} ${time(d.finished_at)} after ${Math.round((d.finished_at - d.created_at) / 60 * 10) / 10} min`;
  } else if (d.status === "paused") {
    text += " · paused";
  }
  if (d.trained_tokens) text += ` · ${d.trained_tokens.toLocaleString()} tokens`;
  const el = $("#job-progress");
  el.dataset.step = String(step);
  el.dataset.total = total == null ? "" : String(total);
  $("#job-progress-text").textContent = text;
}

function renderHyperparameters(d) {
  const method = d.method || {};
  const hp = (method[method.type] || {}).hyperparameters || d.hyperparameters || {};
  const rows = [["method", method.type || "supervised"]];
  for (const [k, v] of Object.entries(hp)) rows.push([k, v]);
  rows.push(["seed", d.seed], ["training file", d.training_file], ["validation file", d.validation_file || "–"]);
  if (d.result_files && d.result_files.length) rows.push(["results", d.result_files.join(", ")]);
  $("#job-hyperparameters").replaceChildren(...rows.map(([k, v]) =>
    h("tr", { "data-key": k }, h("th", {}, k), h("td", { class: typeof v === "string" && v.startsWith("file-") ? "mono" : "" }, num(v, 6)))));
}

async function loadCheckpoints(j) {
  const page = await api(`/fine_tuning/jobs/${j.id}/checkpoints?limit=100`);
  if (job !== j) return;
  const body = $("#job-checkpoints tbody");
  if (!page.data.length) { body.replaceChildren(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "A checkpoint is saved at each epoch end."))); return; }
  body.replaceChildren(...page.data.map((c) => {
    const name = c.fine_tuned_model_checkpoint;
    return h("tr", { "data-step": c.step_number },
      h("td", {}, c.step_number),
      h("td", { class: "mono" }, name),
      h("td", {}, num(c.metrics.train_loss)),
      h("td", {}, num(c.metrics.valid_loss ?? c.metrics.full_valid_loss)),
      h("td", { class: "nowrap" },
        h("button", { class: "small", onclick: (ev) => copy(name, ev.target) }, "Copy"), " ",
        h("a", { class: "button small", href: `#/playground?model=${encodeURIComponent(name)}` }, "Playground")));
  }));
}

async function control(action) {
  if (!job) return;
  if (action === "cancel" && !confirm("Cancel this job? It cannot be resumed.")) return;
  try {
    job.data = await api(`/fine_tuning/jobs/${job.id}/${action}`, { method: "POST" });
    renderJob(job);
    refreshJobs();
  } catch (err) { say(err.message, "error"); }
}
for (const action of ["pause", "resume", "cancel"]) $(`#job-${action}`).addEventListener("click", () => control(action));

// ---------------------------------------------------------------- files

async function refreshFiles() {
  try {
    const page = await api("/files?limit=200");
    $("#files").replaceChildren(...page.data.map((f) =>
      h("li", { testid: "file-row", "data-id": f.id, class: f.id === current.id ? "selected" : "", onclick: () => (location.hash = `#/files/${f.id}`) },
        h("div", { class: "row1" }, f.filename),
        h("div", { class: "row2 muted" }, `${f.id} · ${f.purpose} · ${(f.bytes / 1024).toFixed(1)} KB`))));
    if (!page.data.length) $("#files").append(h("li", { class: "muted" }, "No files yet."));
  } catch (err) { say(err.message, "error"); }
}

async function openFile(id) {
  $("#file-empty").hidden = !!id;
  $("#file-body").hidden = !id;
  if (!id) return;
  const [file] = await Promise.all([api(`/files/${id}`)]).catch((err) => { say(err.message, "error"); return [null]; });
  if (!file) return;
  $("#file-name").textContent = file.filename;
  $("#file-id").textContent = `${file.id} · ${file.purpose} · ${file.bytes.toLocaleString()} bytes · ${time(file.created_at)}`;
  loadValidation(id);
}

$("#file-method").addEventListener("change", () => current.id && loadValidation(current.id));

async function loadValidation(id) {
  const box = $("#file-validation");
  box.dataset.state = "loading";
  $("#file-validating").hidden = false;
  $("#file-validating").textContent = "Validating…";
  $("#file-summary").replaceChildren();
  $("#file-issues tbody").replaceChildren();
  let report;
  try {
    report = await api(`/files/${id}/validation?method=${$("#file-method").value}`);
  } catch (err) {
    $("#file-validating").textContent = err.message;
    box.dataset.state = "error";
    return;
  }
  if (current.id !== id) return;
  $("#file-validating").hidden = true;
  const s = report.summary;
  const stat = (label, value, cls = "") => h("div", { class: `stat ${cls}` }, h("b", {}, value), h("span", {}, label));
  $("#file-summary").replaceChildren(
    stat("verdict", report.ok ? "trainable" : "not trainable", report.ok ? "ok" : "bad"),
    stat("examples", s.examples), stat("usable", s.usable_examples), stat("images", s.images),
    stat("skipped", s.skipped_examples), stat("errors", s.errors),
    s.tokens && s.tokens.total != null ? stat("tokens", s.tokens.total.toLocaleString()) : null);
  const rows = report.issues.map((i) => h("tr", { class: `sev-${i.severity}`, "data-code": i.code },
    h("td", {}, i.line || "file"),
    h("td", { class: "mono small" }, i.field),
    h("td", {}, h("code", {}, i.code), h("div", { class: "muted small" }, i.severity)),
    h("td", {}, i.thumbnail ? h("img", { src: i.thumbnail, class: "thumb", testid: "file-image-thumb", alt: `line ${i.line}: ${i.code}`, title: i.message }) : ""),
    h("td", {}, i.message)));
  $("#file-issues tbody").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No issues."))]));
  box.dataset.state = "done";
}

// ---------------------------------------------------------------- playground

const chats = { a: [], b: [] };
let pgImage = null; // data URL of the attached image
let knownModels = [];

async function openPlayground(wanted) {
  try {
    const models = (await api("/models")).data.map((m) => m.id);
    knownModels = [...new Set([...models, ...knownModels, ...(wanted ? [wanted] : [])])];
  } catch (err) { say(err.message, "error"); return; }
  for (const col of ["a", "b"]) {
    const select = $(`#pg-model-${col}`);
    const keep = select.value;
    select.replaceChildren(...knownModels.map((m) => h("option", { value: m }, m)));
    if (col === "a" && wanted) select.value = wanted;
    else if (keep && knownModels.includes(keep)) select.value = keep;
  }
}

$("#pg-compare").addEventListener("change", (ev) => {
  document.querySelector('.pg-col[data-col="b"]').hidden = !ev.target.checked;
  $("#pg-columns").classList.toggle("two", ev.target.checked);
});
$("#pg-clear").addEventListener("click", () => {
  chats.a = []; chats.b = []; $("#pg-chat-a").replaceChildren(); $("#pg-chat-b").replaceChildren();
});
$("#pg-image").addEventListener("change", (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { pgImage = reader.result; $("#pg-image-preview").src = pgImage; $("#pg-image-preview").hidden = false; };
  reader.readAsDataURL(file);
});
$("#pg-image-preview").addEventListener("click", () => { pgImage = null; $("#pg-image-preview").hidden = true; $("#pg-image").value = ""; });

$("#pg-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("#pg-input").value.trim();
  if (!text && !pgImage) return;
  const content = pgImage ? [{ type: "text", text }, { type: "image_url", image_url: { url: pgImage } }] : text;
  const cols = $("#pg-compare").checked ? ["a", "b"] : ["a"];
  for (const col of cols) ask(col, content, text);
  $("#pg-input").value = "";
  pgImage = null; $("#pg-image-preview").hidden = true; $("#pg-image").value = "";
});
$("#pg-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("#pg-form").requestSubmit(); }
});

async function ask(col, content, text) {
  const model = $(`#pg-model-${col}`).value;
  const log = $(`#pg-chat-${col}`);
  const history = chats[col];
  history.push({ role: "user", content });
  const user = h("div", { class: "msg user" }, text);
  if (Array.isArray(content)) user.append(h("img", { src: content[1].image_url.url, class: "thumb" }));
  const testid = col === "a" ? "playground-answer" : "playground-answer-b";
  for (const old of log.querySelectorAll(`[data-testid=${testid}]`)) old.removeAttribute("data-testid");
  const answer = h("div", { class: "msg assistant", testid, "data-done": "false" });
  const meta = h("div", { class: "meta" }, model);
  log.append(user, h("div", { class: "turn" }, meta, answer));
  log.scrollTop = log.scrollHeight;
  const started = performance.now();
  let reply = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { Authorization: "Bearer " + key, "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: history, stream: true,
        temperature: Number($("#pg-temperature").value), max_tokens: Number($("#pg-max-tokens").value) || 64 }),
    });
    if (!resp.ok) {
      const data = await resp.json().catch(() => ({}));
      throw new ApiError(data.error ? data.error.message : `${resp.status} ${resp.statusText}`);
    }
    // Server-sent events: "data: {chunk}\n\n" ... "data: [DONE]".
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (payload === "[DONE]") continue;
          const chunk = JSON.parse(payload);
          if (chunk.error) throw new ApiError(chunk.error.message);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) { reply += delta.content; answer.textContent = reply; }
        }
      }
    }
    history.push({ role: "assistant", content: reply });
    meta.textContent = `${model} · ${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (err) {
    history.pop();
    answer.classList.add("error");
    answer.textContent = err.message;
  }
  answer.dataset.done = "true";
  log.scrollTop = log.scrollHeight;
}

// ---------------------------------------------------------------- start

showKey();
route();
setInterval(() => {
  if (!key || document.hidden) return;
  if (current.view === "jobs") { refreshJobs(); if (job && (!job.data || !TERMINAL.includes(job.data.status) || !job.settled)) { if (job.data && TERMINAL.includes(job.data.status)) job.settled = true; refreshJob(); } }
  else if (current.view === "files") refreshFiles();
}, 2000);
