// A hand-written SVG chart of a job's per-step metrics: loss on top, token accuracy below,
// training and validation series in each. Every recorded step is drawn (no thinning), so the
// number of points equals the number of steps the metrics API returns.
const NS = "http://www.w3.org/2000/svg";
const W = 640, H = 330, LEFT = 48, RIGHT = 12, TOP = 10, GAP = 34, BOTTOM = 26;
const PANEL = (H - TOP - GAP - BOTTOM) / 2;
const SERIES = [
  { key: "train_loss", panel: 0, cls: "s-train", label: "training loss" },
  { key: "valid_loss", panel: 0, cls: "s-valid", label: "validation loss" },
  { key: "train_mean_token_accuracy", panel: 1, cls: "s-train", label: "training token accuracy" },
  { key: "valid_mean_token_accuracy", panel: 1, cls: "s-valid", label: "validation token accuracy" },
];

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const step = 10 ** Math.floor(Math.log10(span / count));
  const mult = [1, 2, 5, 10].find((m) => span / (m * step) <= count) * step;
  const ticks = [];
  for (let t = Math.ceil(lo / mult) * mult; t <= hi + 1e-12; t += mult) ticks.push(+t.toPrecision(6));
  return ticks;
}

function logTicks(lo, hi) {
  const ticks = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++)
    for (const m of [1, 3]) { const t = +(m * 10 ** e).toPrecision(3); if (t >= lo && t <= hi) ticks.push(t); }
  return ticks;
}

const fmt = (v) => (v == null ? "–" : Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(4));

/** Draw `rows` (StepMetrics, oldest first) into `wrap`; returns the <svg>. */
export function drawChart(wrap, rows, totalSteps) {
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", "data-testid": "loss-chart", role: "img" });
  const maxStep = Math.max(totalSteps || 0, rows.length ? rows[rows.length - 1].step : 1, 1);
  const x = (step) => LEFT + ((step - 1) / Math.max(maxStep - 1, 1)) * (W - LEFT - RIGHT);
  const counts = {};
  for (const panel of [0, 1]) {
    const top = TOP + panel * (PANEL + GAP);
    const values = [];
    for (const s of SERIES.filter((s) => s.panel === panel))
      for (const r of rows) if (r[s.key] != null) values.push(r[s.key]);
    let lo = values.length ? Math.min(...values) : 0, hi = values.length ? Math.max(...values) : 1;
    // Loss falls over orders of magnitude: a log axis keeps its tail readable. Accuracy is linear.
    const log = panel === 0 && lo > 0 && hi / lo > 30;
    if (!log) lo = 0;
    if (panel === 1) hi = Math.min(1, Math.max(hi, 0.1));
    if (hi - lo < 1e-9) hi = lo + 1;
    const f = log ? Math.log10 : (v) => v;
    const [flo, fhi] = [f(lo), f(hi)];
    const y = (v) => top + PANEL - ((f(v) - flo) / (fhi - flo)) * PANEL;
    svg.append(el("text", { x: LEFT, y: top - 1, class: "axis-title" }, panel ? "token accuracy" : log ? "loss (log scale)" : "loss"));
    const ticks = log ? logTicks(lo, hi) : niceTicks(lo, hi, 4);
    for (const t of ticks) {
      svg.append(el("line", { x1: LEFT, x2: W - RIGHT, y1: y(t), y2: y(t), class: "grid" }));
      svg.append(el("text", { x: LEFT - 6, y: y(t) + 4, class: "tick", "text-anchor": "end" }, String(t)));
    }
    for (const s of SERIES.filter((s) => s.panel === panel)) {
      const pts = rows.filter((r) => r[s.key] != null);
      counts[s.key] = pts.length;
      if (!pts.length) continue;
      const d = pts.map((r, i) => `${i ? "L" : "M"}${x(r.step).toFixed(1)},${y(r[s.key]).toFixed(1)}`).join("");
      svg.append(el("path", { d, class: `line ${s.cls}` }));
      if (s.key.startsWith("valid") && pts.length <= 60)
        for (const r of pts) svg.append(el("circle", { cx: x(r.step), cy: y(r[s.key]), r: 2.5, class: `dot ${s.cls}` }));
    }
  }
  for (const t of niceTicks(1, maxStep, 8).filter((t) => t >= 1 && Number.isInteger(t)))
    svg.append(el("text", { x: x(t), y: H - 8, class: "tick", "text-anchor": "middle" }, String(t)));
  svg.append(el("text", { x: LEFT - 6, y: H - 8, class: "tick", "text-anchor": "end" }, "step"));
  svg.dataset.points = String(counts.train_loss || 0);
  svg.dataset.validPoints = String(counts.valid_loss || 0);
  svg.dataset.lastStep = String(rows.length ? rows[rows.length - 1].step : 0);
  hover(svg, rows, x, maxStep);
  wrap.replaceChildren(svg);
  return svg;
}

// A vertical cursor and the values of the nearest step, on mouse hover.
function hover(svg, rows, x, maxStep) {
  if (!rows.length) return;
  const cursor = el("line", { y1: TOP, y2: H - BOTTOM, class: "cursor", visibility: "hidden" });
  const label = el("text", { y: TOP + 10, class: "hover-label", visibility: "hidden" });
  svg.append(cursor, label);
  svg.addEventListener("mousemove", (ev) => {
    const box = svg.getBoundingClientRect();
    const px = ((ev.clientX - box.left) / box.width) * W;
    const step = Math.round(1 + ((px - LEFT) / (W - LEFT - RIGHT)) * Math.max(maxStep - 1, 1));
    let best = rows[0];
    for (const r of rows) if (Math.abs(r.step - step) < Math.abs(best.step - step)) best = r;
    const cx = x(best.step);
    cursor.setAttribute("x1", cx); cursor.setAttribute("x2", cx); cursor.setAttribute("visibility", "visible");
    label.textContent = `step ${best.step}: loss ${fmt(best.train_loss)}` +
      (best.valid_loss != null ? `, valid ${fmt(best.valid_loss)}` : "") +
      `, acc ${fmt(best.train_mean_token_accuracy)}`;
    const right = cx > W / 2;
    label.setAttribute("x", right ? cx - 6 : cx + 6);
    label.setAttribute("text-anchor", right ? "end" : "start");
    label.setAttribute("visibility", "visible");
  });
  svg.addEventListener("mouseleave", () => {
    cursor.setAttribute("visibility", "hidden"); label.setAttribute("visibility", "hidden");
  });
}

export function legend(container) {
  container.innerHTML =
    '<span class="key s-train"></span>training <span class="key s-valid"></span>validation';
}
