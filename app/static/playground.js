// The playground: submit a job, follow its events (its live preview and time left included),
// show the images with their seeds.
// Plain JavaScript, no build step. Requests carry the API key from the form (kept in this
// browser's localStorage); events come over fetch, since EventSource cannot send a header.
// With a picture it sends an img2img job, or, once a mask is painted over the picture, an
// inpainting job: multipart, the picture as chosen and the mask as a PNG (white repaints); or,
// with Upscale set, an upscaling job. The models come from GET /v1/models, the LoRAs from
// GET /v1/loras (a row each: which, and its weight), the ControlNets from GET /v1/controlnets
// (one unit: which, its control picture as base64, its weight and preprocessor); a hires fix,
// a refiner (a model of GET /v1/models), clip skip and a VAE (GET /sdapi/v1/sd-vae) go as the
// native request's fields.
"use strict";

const $ = (id) => document.getElementById(id);
const NUMBERS = ["width", "height", "steps", "guidance_scale", "seed", "n"];

function headers() {
  const key = $("key").value.trim();
  localStorage.setItem("sdserve-key", key);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function show(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function request() {
  const body = { prompt: $("prompt").value, scheduler: $("scheduler").value };
  if ($("model").value) body.model = $("model").value;
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  for (const field of NUMBERS) {
    const value = $(field).value;
    if (value !== "") body[field] = field === "guidance_scale" ? parseFloat(value) : parseInt(value, 10);
  }
  const loras = [...document.querySelectorAll("#loras .lora")].map((row) => ({
    name: row.querySelector("select").value,
    weight: parseFloat(row.querySelector("input").value),
  }));
  if (loras.length) body.loras = loras;
  if ($("hires").value) {
    body.hires = {
      scale: parseFloat($("hires").value),
      strength: parseFloat($("hires-strength").value),
      method: $("hires-method").value,
    };
  }
  if ($("refiner").value) {
    body.refiner = { model: $("refiner").value, switch_at: parseFloat($("refiner-switch").value) };
  }
  if ($("clip_skip").value !== "") body.clip_skip = parseInt($("clip_skip").value, 10);
  if ($("vae").value) body.vae = $("vae").value;
  if ($("controlnet").value) {
    const image = await controlPicture;
    if (!image) throw new Error("a ControlNet needs a control picture");
    body.controlnets = [{
      model: $("controlnet").value,
      image,
      weight: parseFloat($("control-weight").value),
      preprocess: $("control-preprocess").value,
    }];
  }
  return body;
}

// The control picture, read as a data URL when chosen (a request carries it as base64). It is
// kept as a promise: a job sent while the file is still being read waits for it instead of
// going without its control.
let controlPicture = Promise.resolve(null);
function chooseControlPicture() {
  const file = $("control-image").files[0];
  controlPicture = !file ? Promise.resolve(null) : new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("the control picture could not be read"));
    reader.readAsDataURL(file);
  });
}

async function problem(response) {
  let detail = response.statusText;
  try {
    detail = (await response.json()).detail;
  } catch (_) { /* not JSON */ }
  if (Array.isArray(detail)) detail = detail.map((e) => `${e.loc.at(-1)}: ${e.msg}`).join("; ");
  return `${response.status}: ${detail}`;
}

// Yields [event, job] for each Server-Sent Event of the job, until the stream ends.
async function* events(url) {
  const response = await fetch(`${url}/events`, { headers: headers() });
  if (!response.ok) throw new Error(await problem(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = /^event: (.*)$/m.exec(block);
      const data = /^data: (.*)$/m.exec(block);
      if (event && data) yield [event[1], JSON.parse(data[1])];
    }
  }
}

async function gallery(job) {
  for (const [k, url] of job.images.entries()) {
    const response = await fetch(url, { headers: headers() });
    if (!response.ok) throw new Error(await problem(response));
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = URL.createObjectURL(await response.blob());
    image.alt = job.request.prompt;
    const caption = document.createElement("figcaption");
    const kind = job.request.kind === "txt2img" ? "" : ` (${job.request.kind})`;
    caption.textContent = `seed ${job.seeds[k]}${kind}`;
    figure.append(image, caption);
    $("gallery").prepend(figure);
  }
}

// -- a picture to start from, and a mask painted over it --------------------------------
let painted = false;

async function choosePicture() {
  const file = $("image").files[0];
  if (!file) return dropPicture();
  const bitmap = await createImageBitmap(file);
  for (const canvas of [$("picture"), $("mask")]) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  $("picture").getContext("2d").drawImage(bitmap, 0, 0);
  clearMask();
  $("canvas-box").hidden = false;
  $("drop-image").disabled = false;
  // The job takes the picture's size unless width and height say otherwise.
  $("width").value = "";
  $("height").value = "";
}

function dropPicture() {
  $("image").value = "";
  $("canvas-box").hidden = true;
  $("drop-image").disabled = true;
  clearMask();
}

function clearMask() {
  const mask = $("mask");
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  painted = false;
  $("clear-mask").disabled = true;
}

function paint(event) {
  if (!(event.buttons & 1)) return;
  const mask = $("mask");
  const box = mask.getBoundingClientRect();
  const x = ((event.clientX - box.left) * mask.width) / box.width;
  const y = ((event.clientY - box.top) * mask.height) / box.height;
  const context = mask.getContext("2d");
  context.fillStyle = "#fff";
  context.beginPath();
  context.arc(x, y, (parseInt($("brush").value, 10) * mask.width) / box.width / 2, 0, 2 * Math.PI);
  context.fill();
  painted = true;
  $("clear-mask").disabled = false;
}

// The painted strokes as the server reads a mask: white on black, the picture's size.
function maskPng() {
  const mask = $("mask");
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const context = out.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, out.width, out.height);
  context.drawImage(mask, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

async function submission() {
  const picture = $("image").files[0];
  if (!picture) {
    return fetch("/v1/txt2img", {
      method: "POST",
      headers: { ...headers(), "Content-Type": "application/json" },
      body: JSON.stringify(await request()),
    });
  }
  const form = new FormData();
  const upscale = $("upscale").value;
  const fields = await request();
  if (fields.hires) throw new Error("a hires fix is for text to image: choose no picture, or no hires fix");
  if (upscale) { // the size is the picture's times the scale
    delete fields.width;
    delete fields.height;
    fields.scale = upscale;
    fields.method = $("upscale-method").value;
  }
  for (const [field, value] of Object.entries(fields)) {
    form.append(field, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  form.append("strength", $("strength").value);
  if (!upscale) form.append("resize_mode", $("resize-mode").value);
  form.append("image", picture, picture.name);
  if (painted && !upscale) {
    form.append("mask", await maskPng(), "mask.png");
    if ($("inpaint-area").value === "masked") form.append("mask_crop", $("mask-crop").value);
    form.append("masked_content", $("masked-content").value);
  }
  const route = upscale ? "/v1/upscale" : painted ? "/v1/inpaint" : "/v1/img2img";
  return fetch(route, { method: "POST", headers: headers(), body: form });
}

let shownPreview = null;

// The preview needs the key's header, so it is fetched, then shown from a blob URL.
async function showPreview(url) {
  shownPreview = url;
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) return; // the job moved on meanwhile
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(await response.blob());
  img.hidden = false;
}

async function run(event) {
  event.preventDefault();
  $("go").disabled = true;
  const progress = $("progress");
  try {
    const response = await submission();
    if (!response.ok) throw new Error(await problem(response));
    const { url } = await response.json();
    show("queued");
    progress.hidden = false;
    progress.value = 0;
    let last = null;
    for await (const [status, job] of events(url)) {
      last = job;
      const left = job.eta_s === null || job.eta_s === undefined ? "" : `, ~${Math.round(job.eta_s)} s left`;
      if (status === "queued") show(`queued: ${job.position} ahead${left}`);
      if (status === "running" && job.progress) {
        progress.max = job.progress.steps;
        progress.value = job.progress.step;
        show(`running: step ${job.progress.step} of ${job.progress.steps}${left}`);
      }
      if (job.preview_url && job.preview_url !== shownPreview) await showPreview(job.preview_url);
    }
    $("preview").hidden = true;
    if (!last || last.status !== "succeeded") {
      const reason = last && last.error ? `${last.error.code}: ${last.error.message}` : last ? last.status : "no answer";
      throw new Error(`job ${reason}`);
    }
    progress.value = progress.max;
    await gallery(last);
    show(`done: ${last.images.length} image(s)`);
  } catch (error) {
    show(error.message, true);
  } finally {
    $("go").disabled = false;
  }
}

// The models to choose from, as the job's model and as its refiner; the default stays selected
// (a failure leaves only the default).
async function models() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) return;
  const data = (await response.json()).data;
  for (const id of ["model", "refiner"]) {
    const select = $(id);
    const chosen = select.value;
    select.replaceChildren(select.options[0]);
    for (const model of data) {
      const option = document.createElement("option");
      option.value = model.id;
      option.textContent = `${model.id}${model.default ? " (default)" : ""}: ${model.workers.length} worker(s)`;
      select.append(option);
    }
    keep(select, chosen);
  }
}

// A list read again (the page's first read and the key's change race each other) keeps what
// was chosen in it while it is still offered: a ControlNet chosen between the two reads went
// unsent otherwise.
function keep(select, chosen) {
  if ([...select.options].some((option) => option.value === chosen)) select.value = chosen;
}

// The VAEs a job may choose (A1111's list); "the model's" stays first.
async function vaes() {
  const response = await fetch("/sdapi/v1/sd-vae", { headers: headers() });
  if (!response.ok) return;
  const select = $("vae");
  const chosen = select.value;
  select.replaceChildren(select.options[0]);
  for (const vae of await response.json()) {
    const option = document.createElement("option");
    option.value = vae.model_name;
    option.textContent = vae.model_name;
    select.append(option);
  }
  keep(select, chosen);
}

// The LoRAs to choose from (GET /v1/loras), with the models each fits.
let loraNames = [];
async function loras() {
  const response = await fetch("/v1/loras", { headers: headers() });
  if (!response.ok) return;
  const data = (await response.json()).data;
  loraNames = data.map((lora) => [lora.name, lora.models.join(", ")]);
  $("add-lora").disabled = loraNames.length === 0;
  $("loras-hint").textContent = loraNames.length
    ? "Each at its weight on every image (the UNet's and the text encoders')."
    : "The server's LoRAs (GET /v1/loras), each at its weight on every image: none served yet.";
}

function addLora() {
  const row = document.createElement("div");
  row.className = "row lora";
  const select = document.createElement("select");
  select.setAttribute("aria-label", "LoRA");
  for (const [name, fits] of loraNames) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = `${name} (${fits})`;
    select.append(option);
  }
  const weight = document.createElement("input");
  Object.assign(weight, { type: "range", min: "-2", max: "2", step: "0.05", value: "1" });
  weight.setAttribute("aria-label", "weight");
  const shown = document.createElement("output");
  shown.value = "1";
  weight.addEventListener("input", () => { shown.value = weight.value; });
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "Remove";
  remove.addEventListener("click", () => row.remove());
  row.append(select, weight, shown, remove);
  $("loras").append(row);
}

// The ControlNets to choose from (GET /v1/controlnets); "none" stays first.
async function controlnets() {
  const response = await fetch("/v1/controlnets", { headers: headers() });
  if (!response.ok) return;
  const select = $("controlnet");
  const chosen = select.value;
  select.replaceChildren(select.options[0]);
  for (const net of (await response.json()).data) {
    const option = document.createElement("option");
    option.value = net.name;
    option.textContent = net.name;
    select.append(option);
  }
  keep(select, chosen);
}

$("key").value = localStorage.getItem("sdserve-key") || "";
models();
loras();
$("key").addEventListener("change", models);
$("key").addEventListener("change", loras);
controlnets();
$("key").addEventListener("change", controlnets);
vaes();
$("key").addEventListener("change", vaes);
$("control-image").addEventListener("change", chooseControlPicture);
$("control-weight").addEventListener("input", () => { $("control-weight-value").value = $("control-weight").value; });
$("add-lora").addEventListener("click", addLora);
$("job").addEventListener("submit", run);
$("image").addEventListener("change", choosePicture);
$("drop-image").addEventListener("click", dropPicture);
$("clear-mask").addEventListener("click", clearMask);
$("mask").addEventListener("pointerdown", paint);
$("mask").addEventListener("pointermove", paint);
$("strength").addEventListener("input", () => { $("strength-value").value = $("strength").value; });
