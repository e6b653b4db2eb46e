// The dashboard page: reads /api/nights and /api/nights/<id>, draws Chart.js charts, lists clips.
// Everything from the run log is put in the page as text (textContent), never as HTML: error
// messages and template names are not ours to trust.
"use strict";

// The stages come from the server (the pipeline's registry), in pipeline order, with /api/nights.
let STAGES = [];
const PALETTE = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"];
const COLOURS = new Proxy({}, { get: (_, stage) => PALETTE[Math.max(STAGES.indexOf(stage), 0) % PALETTE.length] });
// Kept on window so that tests (and a curious user in the console) can read what was drawn.
window.t2v = { charts: {}, nights: null, night: null, ready: false };

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
      el("td", seconds(night.wall_s)), el("td", night.model), el("td", night.id.slice(0, 12)));
    row.addEventListener("click", () => { location.hash = night.id; });
    body.append(row);
  }
  document.getElementById("no-runs").hidden = nights.length > 0;
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

async function load() {
  window.t2v.ready = false;
  try {
    const data = await getJSON("/api/nights");
    STAGES = data.stages;
    window.t2v.nights = data;
    const selected = location.hash.slice(1) || (data.nights[0] && data.nights[0].id);
    drawNights(data.nights, selected);
    drawTrends(data.trends);
    if (selected) {
      window.t2v.night = await getJSON(`/api/nights/${encodeURIComponent(selected)}`);
      drawNight(window.t2v.night);
    }
  } catch (error) {
    document.getElementById("source").textContent = "error: " + error.message;
  }
  window.t2v.ready = true;
}

window.addEventListener("hashchange", load);
load();
