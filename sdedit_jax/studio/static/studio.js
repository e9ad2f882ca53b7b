// The studio page: guide, paint and mask layers at the model's size; edits through the API.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
const layers = { base: $("base"), paint: $("paint"), mask: $("mask"), ui: $("ui") };
const ctx = (name) => layers[name].getContext("2d", { willReadFrequently: true });
let info = null;
let undoStack = [];
let redoStack = [];
let donor = null; // {image, box: [x0, y0, x1, y1] | null, at: [x, y] | null}

async function api(path, body) {
  const options = { headers: { "X-Studio-Token": token } };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const reply = await fetch(path, options);
  const value = await reply.json();
  if (!reply.ok) throw new Error(value.error || reply.statusText);
  return value;
}

function size() { return info.image_size; }

function resetLayers(fillWhite) {
  for (const name of Object.keys(layers)) {
    layers[name].width = layers[name].height = size();
  }
  if (fillWhite) { const c = ctx("base"); c.fillStyle = "#fff"; c.fillRect(0, 0, size(), size()); }
  undoStack = []; redoStack = [];
}

function drawBase(image) {
  resetLayers(true);
  ctx("base").drawImage(image, 0, 0, size(), size());
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("image: cannot decode"));
    image.src = src;
  });
}

function fileURL(file) { return URL.createObjectURL(file); }

// --- history -------------------------------------------------------------------------
function snapshot() {
  return ["base", "paint", "mask"].map((n) => ctx(n).getImageData(0, 0, size(), size()));
}
function restore(state) { ["base", "paint", "mask"].forEach((n, i) => ctx(n).putImageData(state[i], 0, 0)); }
function remember() { undoStack.push(snapshot()); redoStack = []; if (undoStack.length > 50) undoStack.shift(); }
function undo() { if (undoStack.length) { redoStack.push(snapshot()); restore(undoStack.pop()); } }
function redo() { if (redoStack.length) { undoStack.push(snapshot()); restore(redoStack.pop()); } }

// --- drawing -------------------------------------------------------------------------
function tool() { return document.querySelector("input[name=tool]:checked").value; }

function pixelAt(event, canvas, width, height) {
  const rect = canvas.getBoundingClientRect();
  return [
    Math.floor(((event.clientX - rect.left) / rect.width) * width),
    Math.floor(((event.clientY - rect.top) / rect.height) * height),
  ];
}

function strokeStyle(name) {
  const c = ctx(name);
  const t = tool();
  c.lineCap = c.lineJoin = "round";
  c.lineWidth = Number($("size").value);
  c.globalCompositeOperation = t === "eraser" || t === "mask-eraser" ? "destination-out" : "source-over";
  c.globalAlpha = name === "paint" ? Number($("opacity").value) : 1;
  c.strokeStyle = c.fillStyle = name === "paint" ? $("colour").value : "#f00";
  return c;
}

let last = null;
function segment(to) {
  const name = tool().startsWith("mask") ? "mask" : "paint";
  const c = strokeStyle(name);
  c.beginPath();
  c.moveTo(last[0] + 0.5, last[1] + 0.5);
  c.lineTo(to[0] + 0.5, to[1] + 0.5);
  c.stroke();
  last = to;
}

function composedGuide() {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size();
  const c = canvas.getContext("2d", { willReadFrequently: true });
  c.drawImage(layers.base, 0, 0);
  c.drawImage(layers.paint, 0, 0);
  return canvas;
}

function pickColour(at) {
  const [r, g, b] = composedGuide().getContext("2d").getImageData(at[0], at[1], 1, 1).data;
  $("colour").value = "#" + [r, g, b].map((v) => v.toString(16).padStart(2, "0")).join("");
}

layers.ui.addEventListener("mousedown", (event) => {
  const at = pixelAt(event, layers.ui, size(), size());
  const t = tool();
  if (t === "eyedropper") { pickColour(at); return; }
  if (t === "place") { if (donor) { donor.at = at; showCompositeState(); } return; }
  remember();
  last = at;
  segment(at);
});
layers.ui.addEventListener("mousemove", (event) => {
  if (last && event.buttons & 1) segment(pixelAt(event, layers.ui, size(), size()));
});
window.addEventListener("mouseup", () => { last = null; });

// --- mask ----------------------------------------------------------------------------
function maskFromStrokes() {
  remember();
  const radius = Number($("dilation").value);
  const paint = ctx("paint").getImageData(0, 0, size(), size()).data;
  const c = ctx("mask");
  c.globalCompositeOperation = "source-over";
  c.globalAlpha = 1;
  c.fillStyle = "#f00";
  for (let y = 0; y < size(); y++) {
    for (let x = 0; x < size(); x++) {
      if (paint[(y * size() + x) * 4 + 3] === 0) continue;
      for (let dy = -radius; dy <= radius; dy++) {
        for (let dx = -radius; dx <= radius; dx++) {
          if (dx * dx + dy * dy <= radius * radius) c.fillRect(x + dx, y + dy, 1, 1);
        }
      }
    }
  }
}

// The mask as a grayscale PNG (255 = editable; the layer's alpha), or null when empty.
function maskPNG() {
  const source = ctx("mask").getImageData(0, 0, size(), size());
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size();
  const c = canvas.getContext("2d");
  const out = c.createImageData(size(), size());
  let any = false;
  for (let i = 0; i < source.data.length; i += 4) {
    const a = source.data[i + 3];
    any = any || a > 0;
    out.data[i] = out.data[i + 1] = out.data[i + 2] = a;
    out.data[i + 3] = 255;
  }
  if (!any) return null;
  c.putImageData(out, 0, 0);
  return canvas.toDataURL("image/png");
}

// --- compositing (the server runs sdedit_jax.composite's own paste) --------------------
const donorCanvas = $("donor");
let boxStart = null;
function drawDonor() {
  const c = donorCanvas.getContext("2d");
  c.drawImage(donor.image, 0, 0);
  if (donor.box) {
    const [x0, y0, x1, y1] = donor.box;
    c.strokeStyle = "#0af"; c.lineWidth = Math.max(1, donor.image.width / 128);
    c.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
}
function showCompositeState() {
  $("composite-state").textContent = donor
    ? `box ${donor.box ? donor.box.join(",") : "-"}, at ${donor.at ? donor.at.join(",") : "-"}` : "";
}
donorCanvas.addEventListener("mousedown", (event) => {
  if (!donor) return;
  boxStart = pixelAt(event, donorCanvas, donor.image.width, donor.image.height);
});
donorCanvas.addEventListener("mousemove", (event) => {
  if (!donor || !boxStart || !(event.buttons & 1)) return;
  const [x, y] = pixelAt(event, donorCanvas, donor.image.width, donor.image.height);
  donor.box = [Math.min(x, boxStart[0]), Math.min(y, boxStart[1]),
    Math.max(x, boxStart[0]) + 1, Math.max(y, boxStart[1]) + 1];
  drawDonor(); showCompositeState();
});
donorCanvas.addEventListener("mouseup", () => { boxStart = null; });

async function applyComposite() {
  if (!donor || !donor.box || !donor.at) { setStatus("composite: drag a box and place it first"); return; }
  const reply = await api("/api/composite", {
    target: composedGuide().toDataURL("image/png"), source: donor.png,
    box: donor.box, at: donor.at, scale: Number($("scale").value),
    dilate: Number($("composite-dilate").value),
  });
  remember();
  const [guide, mask] = await Promise.all([loadImage("data:image/png;base64," + reply.guide),
    loadImage("data:image/png;base64," + reply.mask)]);
  ctx("base").drawImage(guide, 0, 0);
  ctx("paint").clearRect(0, 0, size(), size());
  setMaskFromGray(mask);
}

function setMaskFromGray(image) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size();
  const c = canvas.getContext("2d");
  c.drawImage(image, 0, 0);
  const gray = c.getImageData(0, 0, size(), size());
  const out = ctx("mask").createImageData(size(), size());
  for (let i = 0; i < gray.data.length; i += 4) { out.data[i] = 255; out.data[i + 3] = gray.data[i]; }
  ctx("mask").putImageData(out, 0, 0);
}

// --- edit and save -------------------------------------------------------------------
function setStatus(text) { $("status").textContent = text; }

function settings() {
  const body = {
    guide: composedGuide().toDataURL("image/png"),
    t0: Number($("t0").value), repeats: Number($("repeats").value), seed: Number($("seed").value),
    samples: Number($("samples").value), preset: $("preset").value, prompt: $("prompt").value,
  };
  if (info.takes_text) {
    body.negative_prompt = $("negative-prompt").value;
    body.guidance_scale = Number($("guidance-scale").value);
  }
  const mask = maskPNG();
  if (mask) body.mask = mask;
  return body;
}

function showResults(reply) {
  $("progress").max = reply.total;
  $("progress").value = reply.finished;
  const gallery = $("gallery");
  gallery.innerHTML = "";
  for (const result of reply.results) {
    if (!result.png) continue;
    const figure = document.createElement("figure");
    figure.innerHTML = `<img class="result" alt="edit, seed ${result.seed}"><figcaption>seed ${result.seed} <button>Save</button></figcaption>`;
    figure.querySelector("img").src = "data:image/png;base64," + result.png;
    figure.querySelector("button").onclick = () => save(result.seed);
    gallery.appendChild(figure);
  }
}

async function edit() {
  $("edit").disabled = true;
  try {
    let reply = await api("/api/edit", settings());
    setStatus("queued");
    while (reply.status === "running") {
      showResults(reply);
      setStatus(`editing: ${reply.finished} of ${reply.total}`);
      reply = await api(`/api/jobs/${reply.job}?wait=1`);
    }
    if (reply.status === "failed") throw new Error(reply.error);
    showResults(reply);
    setStatus(`done: ${reply.total} result${reply.total === 1 ? "" : "s"}`);
  } catch (error) {
    setStatus(error.message);
  } finally {
    $("edit").disabled = false;
  }
}

// Saves the guide and mask with the settings and ``seed`` (default: the seed field).
async function save(seed) {
  try {
    const body = settings();
    if (Number.isInteger(seed)) body.seed = seed;
    const reply = await api("/api/save", body);
    $("command").textContent = reply.command_line;
    setStatus(`saved ${reply.id} to ${reply.manifest}`);
  } catch (error) {
    setStatus(error.message);
  }
}

// --- start ---------------------------------------------------------------------------
async function refreshDataset() {
  const { guides } = await api("/api/dataset");
  const pick = $("dataset-pick");
  pick.length = 1;
  for (const name of guides) pick.add(new Option(name, name));
}

async function start() {
  info = await api("/api/info");
  $("model-info").textContent = `model ${info.image_size}x${info.image_size}, t0 in (${info.t0_range[0]}, ${info.t0_range[1]}]`;
  for (const name of info.presets) $("preset").add(new Option(name, name, name === info.default_preset));
  $("samples").max = info.max_samples;
  $("repeats").max = info.max_repeats;
  $("prompt-row").hidden = !info.takes_text;
  if (info.takes_text) $("guidance-scale").value = info.default_guidance_scale;
  resetLayers(true);
  await refreshDataset();
  $("upload").onchange = async (e) => { if (e.target.files[0]) drawBase(await loadImage(fileURL(e.target.files[0]))); };
  $("dataset-pick").onchange = async (e) => {
    if (!e.target.value) return;
    const url = `/api/dataset/guide?name=${encodeURIComponent(e.target.value)}&token=${encodeURIComponent(token)}`;
    drawBase(await loadImage(url));
  };
  $("blank").onclick = () => resetLayers(true);
  $("undo").onclick = undo;
  $("redo").onclick = redo;
  $("size").oninput = () => { $("size-out").textContent = $("size").value; };
  $("show-mask").onchange = () => { layers.mask.style.visibility = $("show-mask").checked ? "visible" : "hidden"; };
  $("mask-from-strokes").onclick = maskFromStrokes;
  $("clear-mask").onclick = () => { remember(); ctx("mask").clearRect(0, 0, size(), size()); };
  $("donor-file").onchange = async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    const image = await loadImage(fileURL(file));
    const canvas = document.createElement("canvas");
    canvas.width = image.width; canvas.height = image.height;
    canvas.getContext("2d").drawImage(image, 0, 0);
    donor = { image, png: canvas.toDataURL("image/png"), box: null, at: null };
    donorCanvas.width = image.width; donorCanvas.height = image.height;
    donorCanvas.style.width = `${Math.min(256, image.width * 8)}px`;
    drawDonor(); showCompositeState();
  };
  $("apply-composite").onclick = () => applyComposite().catch((e) => setStatus(e.message));
  $("edit").onclick = edit;
  $("save").onclick = () => save();
  setStatus("ready");
}

start().catch((error) => setStatus(error.message));
