// The operations page: GET /console/api/operations every refresh_s, rendered as text into the tables.
"use strict";

const $ = (id) => document.getElementById(id);
const csrf = document.querySelector('meta[name="qvl-csrf"]').content;
let refreshMs = 1000;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}
const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);
const num = (x, digits = 0) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const ms = (s) => (s === null || s === undefined ? "–" : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`);
const gib = (b) => (b === null || b === undefined ? "–" : `${(b / 2 ** 30).toFixed(1)}`);

function bar(ratio) {
  const outer = el("span", "bar");
  const inner = el("i");
  inner.style.width = `${Math.max(0, Math.min(1, ratio || 0)) * 100}%`; // CSSOM: allowed by the CSP
  outer.append(inner);
  return outer;
}

function cell(row, content) {
  const td = el("td");
  if (content instanceof Node) td.append(content); else td.textContent = content;
  row.append(td);
  return td;
}

function staleBadge(row, source) {
  row.dataset.stale = source.stale ? "true" : "false";
  if (source.stale) row.classList.add("stale");
  return source.stale ? el("span", "badge stale", `stale ${Math.round(source.age_s)} s`) : null;
}

function renderRouter(r) {
  $("window").textContent = r.seconds ? `last ${Math.round(r.seconds)} s` : "collecting…";
  const cards = [
    ["Requests / s", num(r.request_rate, 2), "request-rate"],
    ["Errors (5xx)", pct(r.error_ratio), "error-ratio"],
    ["Refused (4xx)", pct(r.refused_ratio), "refused-ratio"],
    ["TTFT P50", ms(r.ttft_p50_s), "ttft-p50"],
    ["TTFT P95", ms(r.ttft_p95_s), "ttft-p95"],
    ["End-to-end P50", ms(r.e2e_p50_s), "e2e-p50"],
    ["End-to-end P95", ms(r.e2e_p95_s), "e2e-p95"],
    ["Cache hits", pct(r.cache_hit_ratio), "cache-hit-ratio"],
  ];
  $("router-cards").replaceChildren(...cards.map(([label, value, key]) => {
    const card = el("div", "card");
    card.dataset.metric = key;
    card.append(el("span", "v", value), el("span", "k", label));
    return card;
  }));
}

function renderReplicas(replicas) {
  $("replicas").replaceChildren(...replicas.map((r) => {
    const row = el("tr");
    row.dataset.replica = r.name;
    row.dataset.state = r.state;
    const name = cell(row, r.name);
    name.title = r.url;
    const state = cell(row, el("span", `badge ${r.state}`, r.state));
    const stale = staleBadge(row, r);
    if (stale) state.append(stale);
    if (r.last_error) state.title = r.last_error;
    cell(row, r.models.join(", ") || "–");
    cell(row, num(r.in_flight));
    cell(row, num(r.engine_waiting));
    cell(row, num(r.engine_running));
    const kv = cell(row, bar(r.kv_cache_usage));
    kv.append(pct(r.kv_cache_usage));
    const mm = cell(row, pct(r.image_cache_hit_ratio));
    mm.title = `since the engine started: ${pct(r.image_cache_hit_ratio_total)}`;
    cell(row, `${num(r.age_s, 1)} s ago`);
    return row;
  }));
}

function renderGpus(gpus, exporters) {
  $("gpus").replaceChildren(...gpus.map((g) => {
    const row = el("tr");
    row.dataset.gpu = `${g.host}/${g.gpu}`;
    cell(row, g.host);
    const id = cell(row, `${g.gpu} · ${g.name}`);
    const stale = staleBadge(row, { stale: g.stale, age_s: (exporters.find((e) => e.name === g.exporter) || {}).age_s || 0 });
    if (stale) id.append(stale);
    const used = g.memory_used_bytes, total = g.memory_total_bytes;
    const memory = cell(row, bar(total ? used / total : 0));
    memory.append(`${gib(used)} / ${gib(total)} GiB`);
    const util = cell(row, bar(g.utilization));
    util.append(pct(g.utilization));
    cell(row, g.temperature_c === undefined ? "–" : `${num(g.temperature_c)} °C`);
    cell(row, g.power_w === undefined ? "–" : `${num(g.power_w)} / ${num(g.power_limit_w)} W`);
    cell(row, g.exporter);
    return row;
  }));
  const notes = exporters.map((e) => {
    if (e.stale) return `${e.name}: stale, no answer for ${Math.round(e.age_s)} s${e.last_error ? ` (${e.last_error})` : ""}`;
    if (e.nvml_up === false) return `${e.name}: answers, but reads no NVML (no GPU driver there)`;
    return `${e.name}: ${e.gpus} GPU(s)`;
  });
  $("exporters").textContent = exporters.length ? "GPU exporters: " + notes.join("; ") : "No GPU exporter configured (router.console.gpu_exporters).";
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

async function cancelBatch(id, button) {
  button.disabled = true;
  const response = await fetch(`/console/api/batches/${encodeURIComponent(id)}/cancel`, {
    method: "POST", credentials: "same-origin", headers: { "x-csrf-token": csrf },
  });
  const doc = await response.json();
  button.textContent = response.ok ? doc.status : (doc.error || {}).message || "failed";
}

function renderBatches(batches) {
  if (batches === null) { $("batches-note").textContent = "Batch jobs are off (router.batch.enabled)."; return; }
  $("batches-note").textContent = batches.length ? "" : "No batch job is running.";
  $("batches").replaceChildren(...batches.map((b) => {
    const row = el("tr");
    row.dataset.batch = b.id;
    row.dataset.status = b.status;
    cell(row, b.id);
    cell(row, b.owner || "–");
    cell(row, el("span", `badge ${b.status === "in_progress" ? "healthy" : "failing"}`, b.status));
    const done = b.completed + b.failed;
    const progress = cell(row, bar(b.total ? done / b.total : 0));
    progress.append(`${done} / ${b.total}`);
    cell(row, num(b.failed));
    cell(row, b.lines_per_s === null ? "–" : `${b.lines_per_s.toFixed(1)} lines/s`);
    cell(row, duration(b.eta_s));
    const action = cell(row, "");
    if (b.cancellable) {
      const button = el("button", "secondary", "Cancel");
      button.type = "button";
      button.addEventListener("click", () => cancelBatch(b.id, button));
      action.append(button);
    }
    return row;
  }));
}

async function rolloutAction(model, action, button) {
  button.disabled = true;
  const response = await fetch(`/console/api/rollouts/${encodeURIComponent(action)}`, {
    method: "POST", credentials: "same-origin",
    headers: { "x-csrf-token": csrf, "content-type": "application/json" },
    body: JSON.stringify({ model }),
  });
  const doc = await response.json();
  button.textContent = response.ok ? doc.status : (doc.error || {}).message || "failed";
}

const weights = (list) => list.map((w) => `${w.version} ${num(w.percent, w.percent % 1 ? 1 : 0)} %`).join(" · ");
const rolloutBadge = { running: "healthy", paused: "failing", promoted: "healthy", aborted: "ejected" };

function analysisCell(row, analysis) {
  const td = cell(row, "");
  if (!analysis) { td.textContent = "none yet"; return; }
  td.classList.add("analysis");
  td.append(el("span", `badge ${analysis.decision === "abort" ? "ejected" : analysis.decision === "hold" ? "failing" : "healthy"}`, analysis.decision));
  td.append(el("span", "hint", ` ${analysis.canary_requests} new / ${analysis.baseline_requests} baseline requests`));
  const checks = el("ul", "checks");
  for (const c of analysis.checks) {
    const item = el("li", c.passed ? "pass" : "fail");
    item.dataset.check = c.name;
    item.append(el("b", null, c.name), ` ${c.passed ? "pass" : "FAIL"}: ${c.detail}`);
    checks.append(item);
  }
  td.append(checks);
}

function renderRollouts(panel) {
  const rows = panel.data;
  if (panel.error) $("rollouts-note").textContent = `No rollouts to show: ${panel.error.message}.`;
  else $("rollouts-note").textContent = rows.length ? "" : "No rollout yet (qvl rollout start MODEL --to VERSION).";
  $("rollouts").replaceChildren(...rows.map((r) => {
    const row = el("tr");
    row.dataset.rollout = r.model;
    row.dataset.status = r.status;
    cell(row, r.model);
    cell(row, `${r.baseline} → ${r.target}`);
    cell(row, el("span", `badge ${rolloutBadge[r.status] || ""}`, r.status));
    const step = cell(row, bar(r.step_percent / 100));
    step.append(`${num(r.step_percent, r.step_percent % 1 ? 1 : 0)} % (step ${r.step + 1} of ${r.steps.length})`);
    const here = cell(row, r.applied_here ? weights(r.applied_here) : "no route here");
    here.title = `the rollout set: ${weights(r.route)}`;
    if (r.applied_here && weights(r.applied_here) !== weights(r.route)) here.append(el("span", "badge stale", "not applied yet"));
    analysisCell(row, r.analysis);
    const reason = cell(row, r.reason);
    reason.classList.add("reason");
    const actions = cell(row, "");
    for (const action of r.actions) {
      const button = el("button", "secondary", action[0].toUpperCase() + action.slice(1));
      button.type = "button";
      button.dataset.action = action;
      button.addEventListener("click", () => rolloutAction(r.model, action, button));
      actions.append(button);
    }
    return row;
  }));
}

const SVG = "http://www.w3.org/2000/svg";
const tokens = (x) => (x === null || x === undefined ? "–" : x >= 1000 ? `${(x / 1000).toFixed(1)} k` : num(x));
const directionBadge = { up: "healthy", down: "failing", hold: "" };
const outcomeText = { applied: "applied", dry_run: "dry run", not_applied: "not applied" };

function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

// desired, actual, serving (steps, drawn thick to thin so that equal ones stay visible) and needed (dashed) on a
// replica scale, the max bound when it is in view, over the prefill load as a shaded area scaled to its own
// peak: an inline SVG drawn from the panel's history.
function historyChart(a) {
  const width = 220, height = 64, pad = 2;
  const points = a.history;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "chart", role: "img" });
  chart.dataset.points = String(points.length);
  if (points.length < 2) {
    chart.append(Object.assign(svg("text", { x: pad + 4, y: height / 2 }), { textContent: "collecting…" }));
    return chart;
  }
  const t0 = points[0].at, t1 = points[points.length - 1].at;
  const x = (t) => (pad + ((width - 2 * pad) * (t - t0)) / (t1 - t0 || 1)).toFixed(1);
  const top = Math.max(1, ...points.map((s) => Math.max(s.desired, s.actual, s.needed))) * 1.25 + 0.5;
  const y = (v) => (height - pad - ((height - 2 * pad) * v) / top).toFixed(1);
  const peak = Math.max(...points.map((s) => s.prefill_tokens_s)) || 1;
  const load = points.map((s) => `${x(s.at)},${(height - pad - ((height - 2 * pad) * s.prefill_tokens_s) / peak).toFixed(1)}`);
  chart.append(svg("polygon", { class: "load", points: `${x(t0)},${height - pad} ${load.join(" ")} ${x(t1)},${height - pad}` }));
  if (a.max <= top) chart.append(svg("line", { class: "bound", x1: pad, x2: width - pad, y1: y(a.max), y2: y(a.max) }));
  const step = (key) => points.map((s, i) => `${i ? `${x(s.at)},${y(points[i - 1][key])} ` : ""}${x(s.at)},${y(s[key])}`).join(" ");
  for (const key of ["actual", "serving", "desired"]) chart.append(svg("polyline", { class: key, points: step(key) }));
  const needed = points.filter((s) => s.needed !== null);
  chart.append(svg("polyline", { class: "needed", points: needed.map((s) => `${x(s.at)},${y(s.needed)}`).join(" ") }));
  chart.append(Object.assign(svg("text", { x: pad + 2, y: 11 }), { textContent: `${duration(t1 - t0)}` }));
  const last = points[points.length - 1];
  const title = svg("title", {});
  title.textContent = `last ${duration(t1 - t0)}: desired ${last.desired}, actual ${last.actual}, serving ${last.serving}, `
    + `needed ${num(last.needed, 1)}; prefill peak ${tokens(peak)} tokens/s`;
  chart.append(title);
  return chart;
}

function decisionCell(row, a) {
  const td = cell(row, "");
  const last = a.last;
  if (!last) { td.textContent = "none yet"; return; }
  td.classList.add("reason");
  row.dataset.direction = last.direction;
  td.append(el("span", `badge ${directionBadge[last.direction]}`, last.direction));
  td.append(` ${last.reason} ${last.from} → ${last.to} `);
  td.append(el("span", `badge ${last.outcome === "applied" ? "healthy" : "failing"}`, outcomeText[last.outcome]));
  td.title = `${duration(last.age_s)} ago`;
}

function renderAutoscaling(panel) {
  const rows = panel.data;
  if (panel.error) $("autoscaling-note").textContent = `No autoscaling status: ${panel.error.message}.`;
  else $("autoscaling-note").textContent = rows.length ? "" : `No autoscaling status: ${panel.note}.`;
  const first = rows[0];
  $("autoscaling-meta").textContent = first ? `policy ${first.policy} · every ${num(first.interval_s, 0)} s${first.dry_run ? " · dry run" : ""}` : "";
  $("autoscaling").replaceChildren(...rows.map((a) => {
    const row = el("tr");
    row.dataset.pool = a.pool;
    const name = cell(row, a.pool);
    if (a.dry_run) name.append(el("span", "badge failing", "dry run"));
    cell(row, `${a.min}–${a.max}`);
    cell(row, el("b", null, String(a.desired)));
    cell(row, `${a.starting} starting · ${a.serving} serving · ${a.draining} draining`);
    cell(row, num(a.needed, 1));
    const load = cell(row, `${tokens(a.load.prefill_tokens_s)} prefill · ${tokens(a.load.decode_tokens_s)} decode tok/s`);
    load.append(el("span", "hint", ` ${num(a.load.in_flight, 0)} in flight${a.load.batch_tokens_s ? ` · batch ${tokens(a.load.batch_tokens_s)} tok/s` : ""}`));
    const capacity = a.capacity.source === "unknown" ? cell(row, "unknown")
      : cell(row, `${tokens(a.capacity.prefill_tokens_s)} / ${tokens(a.capacity.decode_tokens_s)} tok/s `);
    capacity.append(el("span", "hint", `(${a.capacity.source})`));
    decisionCell(row, a);
    const status = cell(row, `${duration(a.age_s)} ago`);
    const stale = staleBadge(row, a);
    if (stale) status.append(stale);
    cell(row, historyChart(a));
    return row;
  }));
}

async function refresh() {
  try {
    const response = await fetch("/console/api/operations", { credentials: "same-origin" });
    if (response.status === 401) { window.location = "/console/signin"; return; }
    if (!response.ok) throw new Error(`${response.status}: ${((await response.json()).error || {}).message || "failed"}`);
    const doc = await response.json();
    refreshMs = doc.refresh_s * 1000;
    renderRouter(doc.router);
    renderReplicas(doc.replicas);
    renderGpus(doc.gpus, doc.exporters);
    renderBatches(doc.batches);
    renderRollouts(doc.rollouts);
    renderAutoscaling(doc.autoscaling);
    $("updated").textContent = `updated ${new Date(doc.generated_at * 1000).toLocaleTimeString()} · every ${doc.refresh_s} s`;
    document.body.dataset.updated = String(doc.generated_at);
    $("ops-error").hidden = true;
  } catch (error) {
    $("ops-error").textContent = `the router did not answer: ${error.message}`;
    $("ops-error").hidden = false;
  } finally {
    setTimeout(refresh, refreshMs);
  }
}

refresh();
