// The dashboard page: reads /api/nights and /api/nights/<id>, draws Chart.js charts, lists clips.
// Everything from the run log is put in the page as text (textContent), never as HTML: error
// messages and template names are not ours to trust. It polls the API by itself: every LIVE_MS while
// a night runs (the recorder writes once a second), every IDLE_MS otherwise (a new night appears), and
// redraws only what changed, so a clip that plays is not restarted by a poll.
"use strict";

const LIVE_MS = 1000;
const IDLE_MS = 5000;

// The stages come from the server (the pipeline's registry), in pipeline order, with /api/nights.
let STAGES = [];
const PALETTE = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"];
const COLOURS = new Proxy({}, { get: (_, stage) => PALETTE[Math.max(STAGES.indexOf(stage), 0) % PALETTE.length] });
// Kept on window so that tests (and a curious user in the console) can read what was drawn.
window.t2v = { charts: {}, nights: null, night: null, ready: false, polls: 0 };
const drawn = { nights: null, trends: null, night: null, clips: null };  // what each part was drawn from

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  if (value < 60) return value.toFixed(1) + " s";
  const m = Math.floor(value / 60);
  return m < 60 ? `${m} min ${Math.round(value % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

function replaceChart(id, config) {
  if (window.t2v.charts[id]) window.t2v.charts[id].destroy();
  config.options = Object.assign({ animation: false, responsive: true, maintainAspectRatio: false }, config.options);
  window.t2v.charts[id] = new Chart(document.getElementById(id), config);
}

function drawTrends(trends) {
  const vram = STAGES.map((stage) => ({
    label: stage + " VRAM", data: trends.peak_vram_gib[stage], borderColor: COLOURS[stage],
    backgroundColor: COLOURS[stage], spanGaps: true,
  }));
  vram.push({ label: "peak RAM", data: trends.peak_ram_gib, borderColor: "#888", backgroundColor: "#888",
    borderDash: [6, 4], spanGaps: true });
  replaceChart("trend-vram", { type: "line", data: { labels: trends.labels, datasets: vram },
    options: { scales: { y: { beginAtZero: true, title: { display: true, text: "GiB" } } } } });
  const anyVram = STAGES.some((s) => trends.peak_vram_gib[s].some((v) => v !== null));
  document.getElementById("trend-vram-note").hidden = anyVram || trends.labels.length === 0;

  replaceChart("trend-wall", { type: "bar", data: { labels: trends.labels, datasets: STAGES.map((stage) => ({
    label: stage, data: trends.wall_s[stage], backgroundColor: COLOURS[stage] })) },
    options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true,
      title: { display: true, text: "seconds" } } } } });
}

// Jobs that did not make their clip: an interrupted night's are not failures (no error to look for).
function notOk(night) {
  if (!night.jobs_interrupted) return night.jobs_failed;
  return (night.jobs_failed ? `${night.jobs_failed}, ` : "") + `${night.jobs_interrupted} interrupted`;
}

function drawNights(nights, selected) {
  const body = document.querySelector("#nights tbody");
  body.replaceChildren();
  for (const night of nights) {
    const row = el("tr");
    row.dataset.run = night.id;
    if (night.id === selected) row.classList.add("selected");
    row.append(el("td", (night.started || "").slice(0, 19).replace("T", " ")), el("td", night.kind),
      el("td", night.status, "status-" + night.status), el("td", night.jobs_ok), el("td", notOk(night)),
      el("td", seconds(night.wall_s)), el("td", night.model), el("td", night.id.slice(0, 12)),
      el("td", nowText(night.live), "now"));
    row.addEventListener("click", () => { location.hash = night.id; });
    body.append(row);
  }
  document.getElementById("no-runs").hidden = nights.length > 0;
}

// A running night in one line: the jobs computing now with their steps, and when it should end.
function nowText(view) {
  if (!view) return "";
  const busy = view.jobs.filter((j) => j.state === "running").map((j) => `${j.template} ${j.stage} ${stepText(j)}`);
  return busy.join(", ") + (view.ends_at ? ` · ends ${clock(view.ends_at)}` : "");
}

// A count without its total is a stage that has started and not yet said how many steps it takes
// (its compute placing a model first, or one that counts none, like finish): nothing to show yet.
function stepText(job) {
  if (job.step === null || job.step === undefined || !job.steps) return "";
  return `${job.step}/${job.steps}`;
}

function clock(iso) {
  return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

// The live panel: elapsed, the estimated end, and each job's stage and step (for an interrupted night,
// the last ones the run log heard of).
function drawLive(night) {
  const view = night.live;
  document.getElementById("live").hidden = !view;
  if (!view) return;
  const running = night.status === "running";
  let meta = `${running ? "running for" : "interrupted after"} ${seconds(view.elapsed_s)}`;
  if (running) meta += view.ends_at ? ` · ends about ${clock(view.ends_at)} (in ${seconds(view.remaining_s)})`
    : " · end not known yet (no stage has a pace to go by)";
  if (running && view.heartbeat_age_s !== null && view.heartbeat_age_s > 10)
    meta += ` · last heard from ${seconds(view.heartbeat_age_s)} ago`;
  document.getElementById("live-meta").textContent = meta;
  const body = document.querySelector("#live-jobs tbody");
  body.replaceChildren();
  for (const job of view.jobs) {
    const row = el("tr");
    row.dataset.template = job.template;
    const bar = el("progress");
    if (job.steps) { bar.max = job.steps; bar.value = job.step || 0; } else bar.hidden = job.state !== "running";
    const cell = el("td");
    cell.append(bar);
    row.append(el("td", job.template), el("td", job.stage, "stage"), el("td", stepText(job), "step"), cell,
      el("td", job.state, "status-" + job.state));
    body.append(row);
  }
}

// Stage bands behind the memory lines: one per stage (the night is stage-major), labelled with its
// plans, and a tick at each attempt's start, so a peak reads against the stage and plan it fell in.
const stageBands = {
  id: "stageBands",
  beforeDatasetsDraw(chart, _args, options) {
    const { ctx, chartArea: area, scales: { x } } = chart;
    ctx.save();
    ctx.font = "11px system-ui, sans-serif";
    (options.bands || []).forEach((band, i) => {
      const x0 = x.getPixelForValue(band.start_s), x1 = x.getPixelForValue(band.end_s);
      ctx.fillStyle = COLOURS[band.stage] + "22";
      ctx.fillRect(x0, area.top, Math.max(x1 - x0, 1), area.bottom - area.top);
      ctx.fillStyle = COLOURS[band.stage];
      ctx.fillText(band.label, x0 + 3, area.top + 12 + 13 * (i % 3));
    });
    for (const mark of options.marks || []) {
      const at = x.getPixelForValue(mark.start_s);
      ctx.strokeStyle = COLOURS[mark.stage];
      ctx.beginPath();
      ctx.moveTo(at, area.bottom);
      ctx.lineTo(at, area.bottom - 8);
      ctx.stroke();
    }
    ctx.restore();
  },
};

function bandsOf(segments) {
  const bands = [];
  for (const stage of STAGES) {
    const rows = segments.filter((s) => s.stage === stage);
    if (!rows.length) continue;
    const plans = [...new Set(rows.map((r) => r.plan).filter((p) => p))];
    bands.push({ stage, start_s: Math.min(...rows.map((r) => r.start_s)), end_s: Math.max(...rows.map((r) => r.end_s)),
      label: plans.length ? `${stage} · ${plans.join(", ")}` : stage });
  }
  return bands;
}

const SERIES = [
  ["nvml_gib", "card used (NVML)", "#e15759"], ["reserved_gib", "card reserved (PyTorch)", "#f28e2b"],
  ["rss_gib", "host RSS", "#4e79a7"], ["cgroup_gib", "cgroup usage", "#76b7b2"],
];

function drawTimeline(night) {
  const points = night.timeline || [];
  document.getElementById("timeline-chart-box").hidden = points.length === 0;
  document.getElementById("timeline-note").hidden = points.length > 0;
  const bands = bandsOf(night.segments || []);
  window.t2v.timeline = { points, bands };
  if (!points.length) {
    if (window.t2v.charts["timeline-chart"]) window.t2v.charts["timeline-chart"].destroy();
    delete window.t2v.charts["timeline-chart"];
    document.getElementById("timeline-peaks").textContent = "";
    return;
  }
  const datasets = SERIES.filter(([key]) => points.some((p) => p[key] !== null)).map(([key, label, colour]) => ({
    label, data: points.map((p) => ({ x: p.t_s, y: p[key] })), borderColor: colour, backgroundColor: colour,
    pointRadius: 0, borderWidth: 1.5 }));
  replaceChart("timeline-chart", { type: "line", data: { datasets }, plugins: [stageBands], options: {
    parsing: false,
    plugins: { stageBands: { bands, marks: night.segments || [] } },
    scales: { x: { type: "linear", min: 0, title: { display: true, text: "since the night started" },
      ticks: { callback: (value) => seconds(value) } },
    y: { beginAtZero: true, title: { display: true, text: "GiB" } } } } });
  document.getElementById("timeline-peaks").textContent = (night.timeline_peaks || []).map((p) => {
    const label = SERIES.find(([key]) => key === p.field)[1];
    const during = p.during.map((d) => `${d.stage} of ${d.template}${d.plan ? ` (${d.plan})` : ""}`).join(", ");
    return `peak ${label} ${p.gib.toFixed(2)} GiB at ${seconds(p.t_s)}${during ? `, in ${during}` : ""}`;
  }).join("; ");
}

function drawNight(night) {
  document.getElementById("night").hidden = false;
  document.getElementById("night-title").textContent = night.id;
  document.getElementById("night-meta").replaceChildren(
    el("span", night.status, "status-" + night.status),
    el("span", ` · ${night.kind} · ${night.jobs_ok} job(s) ok, ${night.jobs_failed} failed` +
      (night.jobs_interrupted ? `, ${night.jobs_interrupted} interrupted` : "") + ` · ${seconds(night.wall_s)} · model ${night.model} · host ${night.host}`));

  // One bar group per (job, stage): wall time on the left axis, memory on the right.
  const labels = [], wall = [], vram = [], ram = [];
  for (const job of night.jobs) {
    for (const stage of STAGES) {
      const f = job.stages[stage];
      if (!f) continue;
      labels.push(`${job.template} · ${stage}`);
      wall.push(f.wall_s);
      vram.push(f.peak_vram_gib);
      ram.push(f.peak_ram_gib);
    }
  }
  // A night that skipped every stage has only zero bars; say why instead of drawing them.
  document.getElementById("night-chart-box").hidden = night.nothing_computed;
  document.getElementById("night-chart-note").hidden = !night.nothing_computed;
  if (night.nothing_computed) {
    if (window.t2v.charts["night-chart"]) window.t2v.charts["night-chart"].destroy();
    delete window.t2v.charts["night-chart"];
  } else replaceChart("night-chart", { type: "bar", data: { labels, datasets: [
    { label: "wall time (s)", data: wall, yAxisID: "y", backgroundColor: "#4e79a7" },
    { label: "peak VRAM (GiB)", data: vram, yAxisID: "y1", backgroundColor: "#e15759" },
    { label: "peak RAM (GiB)", data: ram, yAxisID: "y1", backgroundColor: "#bab0ac" },
  ] }, options: { scales: {
    // Stages of a tiny run take microseconds; without this the axis reads 1.400000E-5.
    y: { beginAtZero: true, position: "left", title: { display: true, text: "seconds" },
      ticks: { callback: (value) => +Number(value).toPrecision(3) } },
    y1: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false },
      title: { display: true, text: "GiB" } } } } });

  // Shown for any night `t2v rerun` takes, failed or interrupted, with or without a failed stage.
  document.getElementById("rerun").hidden = !night.rerun_command;
  document.getElementById("rerun-command").textContent = night.rerun_command || "";
  document.getElementById("rerun-why").textContent = night.status === "interrupted"
    ? `This night was interrupted before ${night.jobs_interrupted + night.jobs_failed} job(s) made their clip.`
    : `${night.jobs_failed} job(s) failed.`;
  const failures = document.getElementById("failures");
  failures.hidden = night.failures.length === 0;
  const body = failures.querySelector("tbody");
  body.replaceChildren();
  for (const f of night.failures) {
    const row = el("tr");
    row.append(el("td", f.template), el("td", f.stage), el("td", f.status, "status-" + f.status),
      el("td", f.attempts), el("td", f.error, "error"));
    body.append(row);
  }

  drawLive(night);
  drawTimeline(night);
  // Clips are rebuilt only when they change: a poll of a running night must not restart one playing.
  const clipsFrom = JSON.stringify([night.id, night.jobs.map((j) => [j.template, j.status, j.clip_key,
    j.outputs, j.first_frame, j.first_frame_note])]);
  if (clipsFrom === drawn.clips) return;
  drawn.clips = clipsFrom;
  const clips = document.getElementById("clips");
  clips.replaceChildren();
  for (const job of night.jobs) {
    const box = el("div", null, "clip");
    box.dataset.template = job.template;
    box.append(el("div", job.template + " ", null));
    box.firstChild.append(el("span", job.status, "status-" + job.status));
    if (job.poster) box.append(thumbnail(job));
    // An image job's first frame (its picture fitted to the clip) beside the clip; none for text-only.
    const pair = el("div", null, "pair");
    if (job.first_frame) pair.append(firstFrame(job));
    if (job.clip_key) {
      const video = el("video");
      video.controls = true;
      video.muted = true;
      video.loop = true;
      video.preload = "auto";
      video.src = `/clips/${job.clip_key}.mp4`;
      if (job.poster) video.poster = job.poster;
      video.dataset.template = job.template;
      pair.append(video);
    } else {
      pair.append(el("p", "no clip", "note"));
    }
    box.append(pair);
    if (job.first_frame_note) box.append(el("p", job.first_frame_note, "note first-frame-note"));
    if (job.outputs && job.outputs.length) box.append(outputList(job));
    clips.append(box);
  }
}

// The poster as the clip's thumbnail; hovering it plays the preview (an animated image) in its place.
function thumbnail(job) {
  const img = el("img", null, "thumb");
  img.src = job.poster;
  img.alt = `${job.template} poster`;
  if (job.preview) {
    img.addEventListener("mouseenter", () => { img.src = job.preview; });
    img.addEventListener("mouseleave", () => { img.src = job.poster; });
  }
  return img;
}

// The picture the clip starts from, as the model was given it, captioned with its file and fit.
function firstFrame(job) {
  const frame = job.first_frame;
  const figure = el("figure", null, "first-frame");
  const img = el("img");
  img.src = frame.url;
  img.alt = `${job.template} first frame from ${frame.picture}`;
  figure.append(img, el("figcaption", `first frame: ${frame.picture} (${frame.size}, ${frame.fit})`));
  return figure;
}

// Every output of the clip, each a link that downloads it under its published name.
function outputList(job) {
  const list = el("ul", null, "outputs");
  for (const out of job.outputs) {
    const link = el("a", out.file);
    link.href = out.url;
    link.download = out.file;
    link.dataset.output = out.name;
    const item = el("li");
    item.append(link, el("span", ` ${out.type}`, "note"));
    list.append(item);
  }
  return list;
}

// Draw `part` from `value` unless it was last drawn from the same data.
function redraw(part, value, draw) {
  const from = JSON.stringify(value);
  if (from === drawn[part]) return;
  drawn[part] = from;
  draw(value);
}

let timer = null;

async function load({ poll = false } = {}) {
  clearTimeout(timer);
  if (!poll) window.t2v.ready = false;
  try {
    const data = await getJSON("/api/nights");
    STAGES = data.stages;
    window.t2v.nights = data;
    const selected = location.hash.slice(1) || (data.nights[0] && data.nights[0].id);
    redraw("nights", [data.nights, selected], ([nights, chosen]) => drawNights(nights, chosen));
    redraw("trends", data.trends, drawTrends);
    if (selected) {
      const night = await getJSON(`/api/nights/${encodeURIComponent(selected)}`);
      window.t2v.night = night;
      redraw("night", night, drawNight);
    }
    document.getElementById("source").textContent = "";
  } catch (error) {
    document.getElementById("source").textContent = "error: " + error.message;
  }
  window.t2v.ready = true;
  window.t2v.polls += 1;
  const live = (window.t2v.nights && window.t2v.nights.nights.some((n) => n.status === "running")) ||
    (window.t2v.night && window.t2v.night.status === "running");
  timer = setTimeout(() => load({ poll: true }), live ? LIVE_MS : IDLE_MS);
}

window.addEventListener("hashchange", () => load());
load();
