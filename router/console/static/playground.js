// The playground: images and a question go to POST /v1/chat/completions as an OpenAI streaming request,
// authenticated by the session cookie and the page's CSRF token. Answers are shown as text, never as HTML.
"use strict";

const csrf = document.querySelector('meta[name="qvl-csrf"]').content;
const $ = (id) => document.getElementById(id);
const conversation = []; // OpenAI messages, images included: every turn re-sends them all
let attached = []; // {url, name, note} waiting to go with the next question
let limits = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  const box = $("chat-error");
  box.textContent = message;
  box.hidden = !message;
}

async function loadConfig() {
  const response = await fetch("/console/api/playground", { credentials: "same-origin" });
  if (response.status === 401) { window.location = "/console/signin"; return; }
  const config = await response.json();
  limits = config.limits;
  const select = $("model");
  for (const model of config.models) select.append(new Option(model, model));
  if (!config.models.length) showError("No healthy replica serves a model this key may use.");
  $("max-tokens").max = String(Math.min(limits.max_tokens, 8192));
  $("limits").textContent = `Up to ${limits.max_images} images; larger than ${(limits.max_image_pixels / 1e6).toFixed(1)} MP ` +
    `or ${(limits.max_image_bytes / 1048576).toFixed(0)} MiB are scaled down here before sending.`;
}

for (const id of ["temperature", "top-p", "max-tokens"]) {
  const input = $(id);
  const show = () => { $(id + "-value").textContent = input.value; };
  input.addEventListener("input", show);
  show();
}

// ---- images --------------------------------------------------------------------------------------------

const FORMATS = { "image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp", "image/bmp": "bmp" };

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// The image as a data URL within the router's limits: as it is when it fits, else re-encoded smaller.
async function prepare(file) {
  const format = FORMATS[file.type];
  if (!format || !limits.image_formats.includes(format)) {
    throw new Error(`${file.name}: not one of ${limits.image_formats.join(", ")}`);
  }
  const bitmap = await createImageBitmap(file);
  const { width, height } = bitmap;
  const pixels = width * height;
  if (pixels <= limits.max_image_pixels && file.size <= limits.max_image_bytes) {
    bitmap.close();
    return { url: await readAsDataURL(file), note: `${width}×${height}` };
  }
  let scale = Math.min(1, Math.sqrt(limits.max_image_pixels / pixels));
  for (let attempt = 0; attempt < 6; attempt++) {
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.floor(width * scale));
    canvas.height = Math.max(1, Math.floor(height * scale));
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff"; // JPEG has no alpha: transparent parts become white
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
    if (blob.size <= limits.max_image_bytes) {
      bitmap.close();
      return { url: await readAsDataURL(blob), note: `scaled ${width}×${height} → ${canvas.width}×${canvas.height}` };
    }
    scale *= 0.7;
  }
  bitmap.close();
  throw new Error(`${file.name}: could not be made smaller than ${limits.max_image_bytes} bytes`);
}

async function addFiles(files) {
  showError("");
  for (const file of files) {
    if (attached.length + imagesInConversation() >= limits.max_images) {
      showError(`At most ${limits.max_images} images per conversation.`);
      break;
    }
    try {
      const image = await prepare(file);
      attached.push({ ...image, name: file.name });
    } catch (error) {
      showError(error.message);
    }
  }
  renderAttached();
}

function imagesInConversation() {
  return conversation.reduce((n, m) => n + (Array.isArray(m.content) ? m.content.filter((p) => p.type === "image_url").length : 0), 0);
}

function renderAttached() {
  const box = $("attached");
  box.replaceChildren();
  attached.forEach((image, i) => {
    const item = el("div", "thumb");
    const img = el("img");
    img.src = image.url;
    img.alt = image.name;
    const remove = el("button", "secondary", "×");
    remove.type = "button";
    remove.title = "remove";
    remove.addEventListener("click", () => { attached.splice(i, 1); renderAttached(); });
    item.append(img, remove, el("span", "hint", image.note));
    box.append(item);
  });
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles([...e.dataTransfer.files]); });
$("files").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });

// ---- chat ----------------------------------------------------------------------------------------------

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  return {
    model: $("model").value,
    messages: messages.concat(conversation),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
  };
}

function addMessage(role, text, images) {
  const box = el("div", "msg " + role);
  for (const image of images || []) {
    const img = el("img");
    img.src = image.url;
    img.alt = image.name;
    box.append(img, el("br"));
  }
  const body = el("span", "text", text);
  box.append(body);
  $("transcript").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

// Reads an SSE body, calling onEvent with each parsed `data:` JSON object until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function seconds(ms) { return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`; }

async function ask(question) {
  showError("");
  const content = attached.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  content.push({ type: "text", text: question });
  const userImages = attached;
  conversation.push({ role: "user", content });
  attached = [];
  renderAttached();
  addMessage("user", question, userImages);
  const answer = addMessage("assistant", "");
  answer.classList.add("pending");
  const text = answer.querySelector(".text");
  const meta = el("span", "meta");
  answer.append(meta);
  const body = requestBody();
  const started = performance.now();
  let first = null;
  let usage = null;
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json", "x-csrf-token": csrf },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const error = (await response.json()).error || {};
      throw new Error(`${response.status} ${error.type || ""}: ${error.message || "request failed"}`);
    }
    const replica = response.headers.get("x-qvl-replica") || "?";
    const cache = response.headers.get("x-qvl-cache") || "none";
    const version = response.headers.get("x-qvl-model-version");
    await readEvents(response, (event) => {
      if (event.error) throw new Error(`${event.error.type}: ${event.error.message}`);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          if (first === null) first = performance.now();
          reply += delta;
          text.textContent = reply;
        }
      }
    });
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : null;
    const rate = tokens && first !== null && ended > first ? (tokens / ((ended - first) / 1000)).toFixed(1) : "–";
    const parts = [
      `TTFT ${first === null ? "–" : seconds(first - started)}`,
      `${rate} tokens/s`,
      `replica ${replica}`,
      `cache ${cache}`,
    ];
    if (tokens !== null) parts.splice(2, 0, `${tokens} tokens`);
    if (version) parts.push(`version ${version}`);
    meta.textContent = parts.join(" · ");
    meta.dataset.replica = replica;
    meta.dataset.ttftMs = first === null ? "" : String(Math.round(first - started));
    conversation.push({ role: "assistant", content: reply });
  } catch (error) {
    conversation.pop(); // the question was not answered: it is not part of the conversation
    attached = userImages.concat(attached);
    renderAttached();
    answer.classList.add("failed");
    meta.textContent = "";
    showError(error.message);
  } finally {
    answer.classList.remove("pending");
    answer.classList.add("done");
  }
}

$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || !$("model").value) return;
  $("send").disabled = true;
  $("question").value = "";
  try { await ask(question); } finally { $("send").disabled = false; $("question").focus(); }
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("clear").addEventListener("click", () => {
  conversation.length = 0;
  attached = [];
  renderAttached();
  $("transcript").replaceChildren();
  showError("");
});

loadConfig().catch((error) => showError("Could not load the playground's settings: " + error.message));
