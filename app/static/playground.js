// The playground: submit a job, follow its events, show the images with their seeds.
// Plain JavaScript, no build step. Requests carry the API key from the form (kept in this
// browser's localStorage); events come over fetch, since EventSource cannot send a header.
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

function request() {
  const body = { prompt: $("prompt").value, scheduler: $("scheduler").value };
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  for (const field of NUMBERS) {
    const value = $(field).value;
    if (value !== "") body[field] = field === "guidance_scale" ? parseFloat(value) : parseInt(value, 10);
  }
  return body;
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
    caption.textContent = `seed ${job.seeds[k]}`;
    figure.append(image, caption);
    $("gallery").prepend(figure);
  }
}

async function run(event) {
  event.preventDefault();
  $("go").disabled = true;
  const progress = $("progress");
  try {
    const response = await fetch("/v1/txt2img", {
      method: "POST",
      headers: { ...headers(), "Content-Type": "application/json" },
      body: JSON.stringify(request()),
    });
    if (!response.ok) throw new Error(await problem(response));
    const { url } = await response.json();
    show("queued");
    progress.hidden = false;
    progress.value = 0;
    let last = null;
    for await (const [status, job] of events(url)) {
      last = job;
      if (status === "queued") show(`queued: ${job.position} ahead`);
      if (status === "running" && job.progress) {
        progress.max = job.progress.steps;
        progress.value = job.progress.step;
        show(`running: step ${job.progress.step} of ${job.progress.steps}`);
      }
    }
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

$("key").value = localStorage.getItem("sdserve-key") || "";
$("job").addEventListener("submit", run);
