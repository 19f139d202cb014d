// The build page, live: one events stream for the build (job and build changes) updates the
// graph, the jobs table, the header and the timeline without a reload; the selected job's log
// opens at its tail and follows Harmont's live log stream.
import { fetchChildren } from "./fragment.js";
import { LogView } from "./log.js";

const data = JSON.parse(document.getElementById("page-data").textContent);
const ICONS = {
  pending: "○", scheduled: "◔", assigned: "◑", running: "▶", passed: "✓", failed: "✗",
  skipped: "↷", canceling: "◌", canceled: "⊘", timing_out: "◌", timed_out: "⏱", failing: "✗",
};
const TERMINAL = new Set(["passed", "failed", "canceled", "skipped", "timed_out"]);

// --- the graph: states, level counts, pan and zoom --------------------------------------------

const jobs = new Map(); // job id -> {key, node, state}
for (const [id, key, node, state] of data.jobs) jobs.set(id, { key, node, state });
const nodes = new Map();
for (const g of document.querySelectorAll("#dag [data-node]")) nodes.set(g.dataset.node, g);

function setStateClass(el, state) {
  for (const c of [...el.classList]) if (c.startsWith("s-")) el.classList.remove(c);
  el.classList.add(`s-${state}`);
}

function drawLevelCounts() {
  if (!data.collapsed) return;
  const counts = new Map();
  for (const job of jobs.values()) {
    const byState = counts.get(job.node) ?? {};
    byState[job.state] = (byState[job.state] ?? 0) + 1;
    counts.set(job.node, byState);
  }
  for (const [node, byState] of counts) {
    const text = document.querySelector(`#dag [data-counts="${CSS.escape(node)}"]`);
    if (!text) continue;
    text.textContent = Object.entries(byState).map(([s, n]) => `${ICONS[s] ?? ""}${n} ${s}`).join("  ");
    const g = nodes.get(node);
    const worst = ["failed", "timed_out", "running", "canceled", "skipped", "scheduled", "pending", "passed"]
      .find((s) => byState[s]);
    if (g && worst) setStateClass(g, worst);
  }
}

function showJob(job) {
  const known = jobs.get(job.id);
  if (!known) return;
  known.state = job.state;
  if (!data.collapsed) {
    const g = nodes.get(known.node);
    if (g) {
      setStateClass(g, job.state);
      const icon = g.querySelector(".icon");
      if (icon) icon.textContent = ICONS[job.state] ?? "";
      const title = g.querySelector("title");
      if (title) title.textContent = `${job.step_key}: ${job.state}`;
    }
  }
  const row = document.querySelector(`#jobs tr[data-job="${CSS.escape(job.id)}"]`);
  if (row) {
    setStateClass(row, job.state);
    const cell = row.querySelector('[data-field="state"]');
    if (cell) {
      setStateClass(cell, job.state);
      cell.textContent = `${ICONS[job.state] ?? ""} ${job.state}`;
    }
    const exit = row.querySelector('[data-field="exit"]');
    if (exit) exit.textContent = job.exit_code === null ? "" : String(job.exit_code);
  }
  if (job.id === data.selected) {
    const state = document.getElementById("log-state");
    if (state) {
      setStateClass(state, job.state);
      state.textContent = `${ICONS[job.state] ?? ""} ${job.state}`;
    }
  }
}

const dag = document.getElementById("dag");
if (dag) {
  const box = dag.viewBox.baseVal;
  const full = { x: box.x, y: box.y, w: box.width, h: box.height };
  const zoom = (factor, cx = box.x + box.width / 2, cy = box.y + box.height / 2) => {
    const w = Math.min(Math.max(box.width * factor, 40), full.w * 4);
    const h = (w / box.width) * box.height;
    box.x = cx - ((cx - box.x) * w) / box.width;
    box.y = cy - ((cy - box.y) * h) / box.height;
    box.width = w;
    box.height = h;
  };
  dag.addEventListener("wheel", (e) => {
    if (!e.ctrlKey && !e.metaKey && !e.altKey) return; // plain wheel scrolls the page
    e.preventDefault();
    const r = dag.getBoundingClientRect();
    zoom(e.deltaY > 0 ? 1.15 : 1 / 1.15, box.x + ((e.clientX - r.left) / r.width) * box.width,
      box.y + ((e.clientY - r.top) / r.height) * box.height);
  }, { passive: false });
  let drag = null;
  dag.addEventListener("pointerdown", (e) => {
    if (e.target.closest("a")) return;
    drag = { x: e.clientX, y: e.clientY };
    dag.setPointerCapture(e.pointerId);
  });
  dag.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const r = dag.getBoundingClientRect();
    box.x -= ((e.clientX - drag.x) / r.width) * box.width;
    box.y -= ((e.clientY - drag.y) / r.height) * box.height;
    drag = { x: e.clientX, y: e.clientY };
  });
  dag.addEventListener("pointerup", () => { drag = null; });
  for (const button of document.querySelectorAll("[data-zoom]")) {
    button.addEventListener("click", () => {
      const how = button.dataset.zoom;
      if (how === "in") zoom(1 / 1.3);
      else if (how === "out") zoom(1.3);
      else Object.assign(box, { x: full.x, y: full.y, width: full.w, height: full.h });
    });
  }
}
drawLevelCounts();

// --- the parts the server renders again: header, jobs table, timeline ------------------------

const params = new URLSearchParams(location.search);
let pending = null;
function refreshParts() {
  if (pending) return;
  pending = setTimeout(async () => {
    pending = null;
    const query = new URLSearchParams(params);
    query.set("part", "live");
    const parts = await fetchChildren(`${data.base}?${query}`);
    for (const part of parts ?? []) {
      const here = part.id && document.getElementById(part.id);
      if (here) here.replaceChildren(...part.childNodes);
    }
  }, 700);
}

// --- the build's events ------------------------------------------------------------------------

function follow() {
  if (TERMINAL.has(data.build.state)) return; // an ended build changes no more
  const url = `/v0/builds/${encodeURIComponent(data.build_id)}/events?token=${encodeURIComponent(data.log_token)}&after=${data.point}`;
  const events = new EventSource(url);
  events.addEventListener("job", (e) => {
    showJob(JSON.parse(e.data));
    drawLevelCounts();
    refreshParts();
  });
  events.addEventListener("build", (e) => {
    data.build = JSON.parse(e.data);
    const state = document.getElementById("build-state");
    if (state) {
      setStateClass(state, data.build.state);
      state.textContent = `${ICONS[data.build.state] ?? ""} ${data.build.state}`;
    }
    document.title = document.title.replace(/^#\d+ \S+/, `#${data.build.number} ${data.build.state}`);
    refreshParts();
  });
  events.addEventListener("done", () => {
    events.close();
    refreshParts();
  });
  events.addEventListener("error", () => {
    if (events.readyState === EventSource.CLOSED) {
      document.body.classList.add("stale");
    }
  });
}
follow();

// --- the selected job's log ------------------------------------------------------------------

const logBox = document.getElementById("log");
if (logBox && data.selected) {
  const view = new LogView(logBox);
  const status = document.getElementById("log-status");
  const earlier = document.getElementById("log-earlier");
  const times = document.getElementById("show-times");
  const windowUrl = `${data.base}/jobs/${encodeURIComponent(data.selected)}/window`;
  let chunks = [];
  let first = null;
  let last = 0;
  let more = false;
  let over = false;
  const note = () => {
    status.textContent = !chunks.length
      ? over ? "This job wrote no output." : "No output yet."
      : more ? "Showing the end of the log; line numbers appear once its start is loaded." : "";
  };

  times?.addEventListener("change", () => logBox.classList.toggle("times", times.checked));

  const atBottom = () => logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 40;
  const add = (more) => {
    const stick = atBottom();
    chunks.push(...more);
    view.append(more);
    if (more.length) last = more[more.length - 1].seq;
    if (stick) logBox.scrollTop = logBox.scrollHeight;
  };

  const loadEarlier = async () => {
    const response = await fetch(`${windowUrl}?before=${first}`, { credentials: "same-origin" });
    if (!response.ok) return false;
    const win = await response.json();
    chunks = win.chunks.concat(chunks);
    first = win.first ?? first;
    // Drawn again from the start, the view keeps the line that was in sight where it was.
    const fromEnd = logBox.scrollHeight - logBox.scrollTop;
    view.reset();
    view.append(chunks);
    logBox.scrollTop = logBox.scrollHeight - fromEnd;
    more = win.more;
    earlier.hidden = !more;
    // Line numbers are true only once the log's start is here.
    logBox.classList.toggle("unnumbered", more);
    note();
    return more;
  };
  earlier.addEventListener("click", () => loadEarlier());

  const start = async () => {
    const response = await fetch(windowUrl, { credentials: "same-origin" });
    if (!response.ok) {
      status.textContent = `The log could not be read (${response.status}); reload the page.`;
      return;
    }
    const win = await response.json();
    first = win.first;
    more = win.more;
    add(win.chunks);
    earlier.hidden = !more;
    logBox.classList.toggle("unnumbered", more);
    const wanted = /^#L(\d+)$/.exec(location.hash);
    if (wanted) {
      while (!earlier.hidden && (await loadEarlier()));
      document.getElementById(`L${wanted[1]}`)?.scrollIntoView({ block: "center" });
      document.getElementById(`L${wanted[1]}`)?.classList.add("target");
    } else {
      logBox.scrollTop = logBox.scrollHeight;
    }
    note();
    const stream = new EventSource(
      `/v0/jobs/${encodeURIComponent(data.selected)}/logs?token=${encodeURIComponent(data.log_token)}&last_event_id=${win.last ?? 0}`,
    );
    stream.addEventListener("history", (e) => {
      add(JSON.parse(e.data).chunks.filter((c) => c.seq > last));
      note();
    });
    stream.addEventListener("chunk", (e) => {
      const chunk = JSON.parse(e.data);
      if (chunk.seq > last) add([chunk]);
      note();
    });
    stream.addEventListener("done", (e) => {
      stream.close();
      view.closeAll();
      const end = JSON.parse(e.data);
      over = true;
      note();
      if (end.state) showJob({ id: data.selected, step_key: "", state: end.state, exit_code: end.exit_code });
    });
  };
  start();
}
