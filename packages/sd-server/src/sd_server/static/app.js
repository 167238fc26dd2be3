// The web page: plain JavaScript over the same /sdapi/v1 API that other programs use.
"use strict";

const $ = (id) => document.getElementById(id);
const api = "/sdapi/v1";
let pngParameters = null;   // the last PNG-info result, for "Use these settings"
let progressSeen = 0;       // progress events that showed a running step (read by the tests)

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && data.detail ? data.detail : response.statusText;
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return data;
}

function showError(message) { $("error").textContent = message || ""; }

// ---------------------------------------------------------------- models and samplers

async function loadSamplers() {
  const samplers = await call("GET", `${api}/samplers`);
  const select = $("sampler");
  select.replaceChildren(new Option("the model's default", ""));
  for (const s of samplers) select.add(new Option(s.name, s.name));
}

async function loadModels() {
  const [models, options] = await Promise.all([
    call("GET", `${api}/sd-models`), call("GET", `${api}/options`)]);
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(m.title, m.title)));
  select.value = options.sd_model_checkpoint;
  $("model-status").textContent = options.sd_model_loading ? `loading ${options.sd_model_loading}…` : "";
  if (options.sd_model_error) showError(`model not loaded: ${options.sd_model_error}`);
  return options;
}

async function switchModel() {
  const title = $("model").value;
  $("model-status").textContent = `loading ${title}…`;
  try {
    await call("POST", `${api}/options`, { sd_model_checkpoint: title });
    for (let i = 0; i < 600; i++) {      // the switch runs in the background
      const options = await call("GET", `${api}/options`);
      if (!options.sd_model_loading) {
        $("model-status").textContent = options.sd_model_error ? "" : `${options.sd_model_checkpoint} loaded`;
        if (options.sd_model_error) showError(`model not loaded: ${options.sd_model_error}`);
        $("model").value = options.sd_model_checkpoint;
        return;
      }
      await new Promise((r) => setTimeout(r, 500));
    }
  } catch (e) { showError(e.message); }
}

// ---------------------------------------------------------------- progress (server-sent events)

function watchProgress() {
  const source = new EventSource("/internal/progress-stream");
  source.onmessage = (event) => {
    const p = JSON.parse(event.data);
    const s = p.state;
    $("progress").value = p.progress;
    if (s.job) {
      if (s.sampling_step > 0) progressSeen += 1;
      document.body.dataset.progressSeen = String(progressSeen);
      const queued = s.queued ? `, ${s.queued} waiting` : "";
      $("status").textContent = `${s.job}: step ${s.sampling_step} of ${s.sampling_steps}` +
        (s.job_count > 1 ? `, batch ${s.job_no + 1} of ${s.job_count}` : "") + queued;
    }
    if (p.current_image) {
      $("preview").src = `data:image/png;base64,${p.current_image}`;
      $("preview").hidden = false;
    }
  };
}

// ---------------------------------------------------------------- the form

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function payload() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    steps: number("steps"),
    cfg_scale: number("cfg"),
    seed: number("seed") ?? -1,
    width: number("width"),
    height: number("height"),
    batch_size: number("batch") ?? 1,
  };
  if ($("sampler").value) body.sampler_name = $("sampler").value;
  if (mode() === "img2img") {
    if (!$("init-preview").src) throw new Error("choose a starting image for image to image");
    body.init_images = [$("init-preview").src];
    body.denoising_strength = number("strength");
    if (maskPainted) body.mask = maskDataURL();
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  let body;
  try { body = payload(); } catch (e) { showError(e.message); return; }
  $("go").disabled = true;
  $("status").textContent = "queued…";
  $("progress").value = 0;
  try {
    const result = await call("POST", `${api}/${mode()}`, body);
    const info = JSON.parse(result.info);
    result.images.forEach((image, i) => addToGallery(image, info.infotexts[i]));
    for (const warning of info.warnings || []) showError(`note: ${warning}`);
    $("progress").value = 1;
    $("status").textContent = `done: ${result.images.length} picture(s)` + (info.interrupted ? " (interrupted)" : "");
    document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1);
  } catch (e) {
    showError(e.message);
    $("status").textContent = "failed";
  } finally {
    $("go").disabled = false;
  }
}

function addToGallery(base64, parameters) {
  const item = document.createElement("li");
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = `data:image/png;base64,${base64}`;
  img.alt = `Generated: ${parameters.split("\n")[0]}`;
  const caption = document.createElement("figcaption");
  const pre = document.createElement("pre");
  pre.textContent = parameters;
  const send = document.createElement("button");
  send.type = "button";
  send.textContent = "Send to img2img";
  send.addEventListener("click", () => sendToImg2img(img.src));
  const save = document.createElement("a");
  save.href = img.src;
  save.download = "sd-server.png";
  save.textContent = "Download";
  caption.append(pre, send, " ", save);
  figure.append(img, caption);
  item.append(figure);
  $("gallery").prepend(item);
}

// ---------------------------------------------------------------- img2img and the mask

let maskPainted = false;
let brushAt = { x: 0, y: 0 };

function setMode(value) {
  document.querySelector(`input[name=mode][value=${value}]`).checked = true;
  $("img2img").hidden = value !== "img2img";
}

function setInitImage(src) {
  const img = $("init-preview");
  img.onload = () => {
    const canvas = $("mask");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    $("width").value = img.naturalWidth - (img.naturalWidth % 8);
    $("height").value = img.naturalHeight - (img.naturalHeight % 8);
    brushAt = { x: canvas.width / 2, y: canvas.height / 2 };
    clearMask();
  };
  img.src = src;
}

function sendToImg2img(src) {
  setMode("img2img");
  setInitImage(src);
  $("prompt").focus();
}

function paint(x, y) {
  const canvas = $("mask");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.beginPath();
  ctx.arc(x, y, Number($("brush").value) / 2, 0, 2 * Math.PI);
  ctx.fill();
  maskPainted = true;
}

function clearMask() {
  const canvas = $("mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  maskPainted = false;
}

function fillMask() {
  const canvas = $("mask");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  maskPainted = true;
}

function invertMask() {
  const canvas = $("mask");
  const ctx = canvas.getContext("2d");
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 3; i < data.data.length; i += 4) {
    const on = data.data[i] > 127;
    data.data[i - 3] = data.data[i - 2] = data.data[i - 1] = 255;
    data.data[i] = on ? 0 : 255;
  }
  ctx.putImageData(data, 0, 0);
  maskPainted = true;
}

function maskDataURL() {
  // white repaints, black keeps: the painted strokes over a black picture
  const canvas = $("mask");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(canvas, 0, 0);
  return out.toDataURL("image/png");
}

function canvasPoint(event) {
  const canvas = $("mask");
  const box = canvas.getBoundingClientRect();
  return {
    x: (event.clientX - box.left) * (canvas.width / box.width),
    y: (event.clientY - box.top) * (canvas.height / box.height),
  };
}

function setUpMask() {
  const canvas = $("mask");
  let down = false;
  canvas.addEventListener("pointerdown", (e) => { down = true; const p = canvasPoint(e); paint(p.x, p.y); });
  canvas.addEventListener("pointermove", (e) => { if (down) { const p = canvasPoint(e); paint(p.x, p.y); } });
  window.addEventListener("pointerup", () => { down = false; });
  canvas.addEventListener("keydown", (e) => {
    const step = Math.max(1, Number($("brush").value) / 2);
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (moves[e.key]) {
      brushAt.x = Math.min(canvas.width, Math.max(0, brushAt.x + moves[e.key][0]));
      brushAt.y = Math.min(canvas.height, Math.max(0, brushAt.y + moves[e.key][1]));
      if (e.shiftKey) paint(brushAt.x, brushAt.y);
    } else if (e.key === " " || e.key === "Enter") {
      paint(brushAt.x, brushAt.y);
    } else {
      return;
    }
    e.preventDefault();
  });
  $("mask-clear").addEventListener("click", clearMask);
  $("mask-fill").addEventListener("click", fillMask);
  $("mask-invert").addEventListener("click", invertMask);
  $("init-file").addEventListener("change", async () => {
    const file = $("init-file").files[0];
    if (file) setInitImage(await readAsDataURL(file));
  });
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ---------------------------------------------------------------- PNG info

async function showPngInfo(file) {
  showError("");
  try {
    const result = await call("POST", `${api}/png-info`, { image: await readAsDataURL(file) });
    $("png-params").textContent = result.info || "This PNG carries no generation parameters.";
    pngParameters = result.info ? result.parameters : null;
    $("png-use").disabled = !pngParameters;
  } catch (e) { showError(e.message); }
}

function usePngParameters() {
  const p = pngParameters;
  if (!p) return;
  const set = (id, value) => { if (value !== undefined && value !== null) $(id).value = value; };
  set("prompt", p.Prompt);
  set("negative", p["Negative prompt"]);
  set("steps", p.Steps);
  set("cfg", p["CFG scale"]);
  set("seed", p.Seed);
  set("width", p["Size-1"]);
  set("height", p["Size-2"]);
  if ([...$("sampler").options].some((o) => o.value === p.Sampler)) $("sampler").value = p.Sampler;
  $("prompt").focus();
}

function setUpDropzone() {
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files[0]) showPngInfo(e.dataTransfer.files[0]);
  });
  $("png-file").addEventListener("change", () => { if ($("png-file").files[0]) showPngInfo($("png-file").files[0]); });
  $("png-use").addEventListener("click", usePngParameters);
}

// ---------------------------------------------------------------- start

async function start() {
  $("generate").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", () => call("POST", `${api}/interrupt`).catch((e) => showError(e.message)));
  $("model").addEventListener("change", switchModel);
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => setMode(mode()));
  }
  // Ctrl+Enter generates from anywhere in the form, as in AUTOMATIC1111's page
  $("generate").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("go").click(); }
  });
  setUpMask();
  setUpDropzone();
  watchProgress();
  try {
    await Promise.all([loadSamplers(), loadModels()]);
    document.body.dataset.ready = "1";
  } catch (e) { showError(e.message); }
}

start();
