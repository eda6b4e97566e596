// The dashboard uses only the public /v1 API with the user's key, like the SDK does.
const $ = (sel) => document.querySelector(sel);
let key = localStorage.getItem("openft-key") || "";
let selectedJob = null;

async function api(path) {
  const resp = await fetch("/v1" + path, { headers: { Authorization: "Bearer " + key } });
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error ? body.error.message : resp.statusText);
  return body;
}

function cell(text) { const td = document.createElement("td"); td.textContent = text ?? ""; return td; }

async function loadJobs() {
  const jobs = await api("/fine_tuning/jobs?limit=50");
  const tbody = $("#jobs tbody");
  tbody.replaceChildren();
  for (const job of jobs.data) {
    const tr = document.createElement("tr");
    tr.className = "job"; tr.dataset.id = job.id;
    const status = cell(job.status); status.className = "status-" + job.status;
    tr.append(cell(job.id), cell(job.model), status, cell(job.fine_tuned_model), cell(job.trained_tokens));
    tr.onclick = () => { selectedJob = job.id; loadJob(); };
    tbody.append(tr);
  }
}

async function loadJob() {
  if (!selectedJob) return;
  $("#events-job").textContent = selectedJob;
  const events = await api(`/fine_tuning/jobs/${selectedJob}/events?limit=100`);
  $("#events").replaceChildren(...events.data.map((e) => {
    const li = document.createElement("li");
    li.className = "level-" + e.level;
    li.textContent = `${new Date(e.created_at * 1000).toLocaleTimeString()} ${e.message}`;
    return li;
  }));
  const ckpts = await api(`/fine_tuning/jobs/${selectedJob}/checkpoints`);
  $("#checkpoints").replaceChildren(...ckpts.data.map((c) => {
    const li = document.createElement("li");
    const loss = c.metrics.train_loss == null ? "" : ` (train loss ${c.metrics.train_loss.toFixed(4)})`;
    li.textContent = `step ${c.step_number}: ${c.fine_tuned_model_checkpoint}${loss}`;
    return li;
  }));
}

async function loadFiles() {
  const files = await api("/files?limit=100");
  $("#files tbody").replaceChildren(...files.data.map((f) => {
    const tr = document.createElement("tr");
    tr.append(cell(f.id), cell(f.filename), cell(f.purpose), cell(f.bytes));
    return tr;
  }));
}

async function refresh() {
  if (!key) { $("#status").textContent = "Enter an API key to see your project."; return; }
  try {
    await Promise.all([loadJobs(), loadFiles(), loadJob()]);
    $("#status").textContent = "";
  } catch (err) {
    $("#status").textContent = err.message;
  }
}

$("#key-form").onsubmit = (ev) => {
  ev.preventDefault();
  key = $("#api-key").value.trim();
  localStorage.setItem("openft-key", key);
  refresh();
};
refresh();
setInterval(refresh, 3000);
