"use strict";
// The chat page. What it keeps lives in this browser's localStorage: each conversation under its own key (two tabs
// then overwrite only a conversation both have open), the settings, the API key. The server keeps nothing between
// requests except its prompt-state cache, which makes the next turn cheap. Answers are drawn by markdown.js.
const CHAT = "qwenlite-chat:", CURRENT = "qwenlite-current", SETTINGS = "qwenlite-settings";
const API_KEY = "qwenlite-chat-key", OLD_CHAT = "qwenlite-chat"; // the one conversation of the page before this one
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop"), thinkBox = $("think");

let model = null, maxContext = null, controller = null;
let attached = []; // the image_url / video_url parts of the next message, their data: URLs inline
// What the server reads at most (serve/image_urls.py: MAX_IMAGE_BYTES, MAX_VIDEO_BYTES); the page refuses more.
const LIMITS = { image: 20 << 20, video: 64 << 20 };
const VIDEO_FILES = /\.(mp4|m4v|webm|mkv|mov|avi|ogv)$/i; // a video the browser gave no type (some systems do)
let views = new Map(); // message -> its view in the log

// --- storage -------------------------------------------------------------------------------------------------

function loadJSON(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

function saveJSON(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch (e) { // images and videos can outgrow the browser's storage: the conversation then lives in this tab only
    console.warn(key + " not saved:", e);
    return false;
  }
}

const defaults = { system: "", temperature: "", maxTokens: "", think: false };
let settings = { ...defaults, ...loadJSON(SETTINGS, {}) };

function newChat() {
  return { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8), messages: [], updated: Date.now() };
}

// An empty conversation is not stored: "New chat" twice leaves nothing behind.
function saveChat(chat) {
  if (chat.deleted) return; // an answer stopped by its conversation's deletion
  if (!chat.messages.length) localStorage.removeItem(CHAT + chat.id);
  else if (!saveJSON(CHAT + chat.id, chat)) {
    $("notice").textContent = "This conversation, its images and videos, is too large for this browser's storage: " +
      "it is kept in this tab only";
  }
}

function storedChats() {
  const list = [];
  for (let i = 0; i < localStorage.length; i++) {
    const key = localStorage.key(i);
    if (key.startsWith(CHAT)) list.push(loadJSON(key, null));
  }
  return list.filter((c) => c && Array.isArray(c.messages)).sort((a, b) => b.updated - a.updated);
}

function openChat() {
  const old = loadJSON(OLD_CHAT, null);
  let opened = loadJSON(CHAT + localStorage.getItem(CURRENT), null) || newChat();
  if (old) { // moved into a conversation of its own
    opened = { ...newChat(), messages: old.messages || [] };
    settings.think = !!old.think;
    saveJSON(SETTINGS, settings);
    saveChat(opened);
    localStorage.removeItem(OLD_CHAT);
  }
  localStorage.setItem(CURRENT, opened.id);
  return opened;
}

let chat = openChat();

// --- messages --------------------------------------------------------------------------------------------------

// A message's content is a string, or OpenAI parts: {type: "text", text}, {type: "image_url", image_url: {url}} and
// vLLM's {type: "video_url", video_url: {url}}.
function textOf(content) {
  return typeof content === "string" ? content : content.filter((p) => p.type === "text").map((p) => p.text).join("");
}
function mediaOf(content) {
  return typeof content === "string" ? [] : content.filter((p) => p.type === "image_url" || p.type === "video_url");
}
function withMedia(media, text) {
  return media.length ? [...media, { type: "text", text }] : text;
}
function urlOf(part) {
  return (part.image_url || part.video_url).url;
}

function titleOf(c) {
  const first = c.messages.find((m) => m.role === "user");
  const text = first ? textOf(first.content).trim().replace(/\s+/g, " ") : "";
  const media = first ? mediaOf(first.content) : [];
  return text.slice(0, 60) || (media.length ? (media[0].type === "video_url" ? "(video)" : "(image)") : "New chat");
}

function element(tag, className = "", text = "") {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text) e.textContent = text;
  return e;
}

function button(text, className, onClick) {
  const b = element("button", className, text);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

// Images as themselves, videos as their first frame (with controls to play them where `playable`).
function thumbnails(parts, playable) {
  const box = element("div", "thumbs");
  for (const part of parts) {
    const video = part.type === "video_url", media = element(video ? "video" : "img");
    media.src = urlOf(part);
    if (video) {
      media.preload = "metadata";
      media.muted = true;
      media.controls = playable;
      media.title = "attached video";
    } else media.alt = "attached image";
    box.append(media);
  }
  return box;
}

function statsText(s) {
  const parts = [`${s.tokens} tokens`];
  if (s.tps) parts.push(`${s.tps.toFixed(1)} tok/s`);
  const used = s.prompt + s.tokens;
  parts.push(`context ${used.toLocaleString("en")}` + (s.context ? ` / ${s.context.toLocaleString("en")}` : ""));
  if (s.finish === "length") parts.push("cut at the token limit");
  return parts.join(" · ");
}

function statsTitle(s) {
  const cached = s.cached ? ` (${s.cached} cached)` : "";
  return `prompt ${s.prompt} tokens${cached}, first token after ${s.ttft.toFixed(2)} s`;
}

// One message in the log, at its place in the conversation. An answer being streamed redraws at most once per frame.
function messageView(message, index) {
  const user = message.role === "user";
  const div = element("div", "msg " + message.role);
  div.append(element("div", "role", user ? "You" : "Assistant"));
  if (mediaOf(message.content).length) div.append(thumbnails(mediaOf(message.content), true));
  const details = element("details"), reasoning = element("div", "reasoning");
  details.append(element("summary", "", "Reasoning"), reasoning);
  if (!user) div.append(details); // reasoning, collapsed
  const content = element("div", user ? "content" : "content md");
  const footer = element("div", "footer"), stats = element("span", "stats");
  footer.append(stats);
  if (user) footer.append(button("Edit", "secondary edit", () => edit(index, div)));
  const again = button("Regenerate", "secondary regenerate", regenerate); // the last answer's
  if (!user) footer.append(again);
  div.append(content, footer);

  let pending = false, error = null;
  function draw() {
    pending = false;
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    details.hidden = !message.reasoning_content;
    reasoning.textContent = message.reasoning_content || "";
    if (user) content.textContent = textOf(message.content);
    else Markdown.render(content, textOf(message.content || ""));
    stats.textContent = message.stats ? statsText(message.stats) : message.stopped ? "stopped" : "";
    stats.title = message.stats ? statsTitle(message.stats) : "";
    if (message.error && !error) content.after((error = element("div", "error"))); // set when its answer ends
    if (error) error.textContent = message.error;
    if (atBottom) log.scrollTop = log.scrollHeight; // follow the answer unless the reader scrolled up
  }
  draw();
  return {
    div, index, draw,
    last(on) {
      again.hidden = !on;
    },
    update() {
      if (!pending) requestAnimationFrame(draw);
      pending = true;
    },
  };
}

// The log of the current conversation. A message still at its place keeps its view, its Markdown rendered once:
// a long conversation costs nothing more per answer. The log stays where the reader left it, or at the end if it
// was there (or `follow`).
function renderAll(follow = false) {
  const top = log.scrollTop, atBottom = follow || log.scrollHeight - top - log.clientHeight < 40;
  const placed = new Map();
  chat.messages.forEach((m, i) => {
    const view = views.get(m);
    placed.set(m, view && view.index === i ? view : messageView(m, i));
    placed.get(m).last(i === chat.messages.length - 1);
  });
  views = placed;
  log.replaceChildren(...[...views.values()].map((view) => view.div));
  log.scrollTop = atBottom ? log.scrollHeight : top;
  renderChats();
}

function renderChats() {
  const list = storedChats();
  if (!list.some((c) => c.id === chat.id)) list.unshift(chat);
  $("chats").replaceChildren(...list.map((c) => {
    const li = element("li", c.id === chat.id ? "current" : "");
    const title = button(titleOf(c), "title", () => switchTo(c.id));
    title.title = titleOf(c);
    li.append(title, button("×", "delete", () => remove(c.id)));
    li.lastChild.title = "Delete this conversation";
    return li;
  }));
}

function switchTo(id) {
  if (controller) controller.abort();
  chat = id ? loadJSON(CHAT + id, null) || newChat() : newChat();
  localStorage.setItem(CURRENT, chat.id);
  $("notice").textContent = "";
  document.body.classList.remove("show-chats");
  renderAll(true);
  input.focus();
}

function remove(id) {
  if (id === chat.id) {
    chat.deleted = true;
    if (controller) controller.abort();
  }
  localStorage.removeItem(CHAT + id);
  if (id === chat.id) switchTo(storedChats().map((c) => c.id)[0]);
  else renderChats();
}

// --- the server ----------------------------------------------------------------------------------------------

// A server started with --api-key wants "Authorization: Bearer KEY"; the page asks once and remembers it.
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(API_KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function authorizedFetch(url, options = {}) {
  let r = await fetch(url, { ...options, headers: headers() });
  if (r.status === 401) {
    const key = prompt("This server needs an API key:");
    if (key) {
      localStorage.setItem(API_KEY, key);
      r = await fetch(url, { ...options, headers: headers() });
    }
  }
  return r;
}

async function loadModel() {
  try {
    const r = await authorizedFetch("v1/models");
    const card = (await r.json()).data[0];
    model = card.id;
    maxContext = card.max_model_len || null;
    $("model").textContent = model;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

// The request for the conversation so far, with the settings applied. A turn that failed before any answer (a refused
// attachment, a prompt over the context, the server gone) is not history, its question no more than its error: one
// bad image would otherwise have every later turn refused.
function requestBody(messages) {
  const failed = (m) => m?.role === "assistant" && m.error && !textOf(m.content);
  const history = messages.filter((m, i) => !failed(m) && !(m.role === "user" && failed(messages[i + 1])))
    .map(({ role, content }) => ({ role, content }));
  if (settings.system.trim()) history.unshift({ role: "system", content: settings.system });
  const body = {
    model, messages: history, stream: true, stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: settings.think },
  };
  if (settings.temperature !== "") body.temperature = Number(settings.temperature);
  if (settings.maxTokens !== "") body.max_tokens = Number(settings.maxTokens);
  return body;
}

function busy(on) {
  sendBtn.hidden = on;
  stopBtn.hidden = !on;
  document.body.classList.toggle("busy", on);
}

// Stream the assistant's answer to the current conversation.
async function answer() {
  const target = chat, body = requestBody(target.messages);
  const reply = { role: "assistant", content: "", reasoning_content: "" };
  target.messages.push(reply);
  target.updated = Date.now();
  saveChat(target);
  renderAll(true);
  controller = new AbortController();
  busy(true);
  const sent = performance.now();
  let first = null, last = null, usage = null, finish = null;
  try {
    const r = await authorizedFetch("v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      const error = await r.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || r.statusText);
    }
    // Server-sent events: "data: {json}" lines, ending with "data: [DONE]"; usage comes in the last chunk.
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const now = performance.now(); // per read: deltas that arrived together share a time
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const choice = (chunk.choices && chunk.choices[0]) || {}, delta = choice.delta || {};
        finish = choice.finish_reason || finish;
        if (delta.reasoning_content) reply.reasoning_content += delta.reasoning_content;
        if (delta.content) reply.content += delta.content;
        if (delta.content || delta.reasoning_content) {
          last = now;
          first = first ?? now;
          views.get(reply)?.update();
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = String(e.message || e);
  } finally {
    if (usage) {
      // Decoding speed: the tokens after the first over the time after it (the first waited for the prompt); none
      // when the answer arrived in one piece (through a buffering proxy, say).
      const tokens = usage.completion_tokens, seconds = (last - first) / 1000;
      reply.stats = {
        tokens, prompt: usage.prompt_tokens, cached: usage.prompt_tokens_details?.cached_tokens || 0,
        context: maxContext, tps: tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : null,
        ttft: ((first ?? performance.now()) - sent) / 1000, finish,
      };
    }
    controller = null;
    busy(false);
    target.updated = Date.now();
    saveChat(target); // a stopped answer is kept as far as it got
    views.get(reply)?.draw();
    renderChats();
  }
}

function send(text) {
  const media = attached;
  attached = [];
  showAttached();
  $("notice").textContent = "";
  chat.messages.push({ role: "user", content: withMedia(media, text) });
  answer();
}

function regenerate() {
  if (controller) return;
  while (chat.messages.length && chat.messages.at(-1).role === "assistant") chat.messages.pop();
  answer();
}

// Edit a user message in place; sending it cuts the conversation after it and asks again.
function edit(index, div) {
  const message = chat.messages[index];
  const editor = element("div", "editor"), area = element("textarea");
  area.value = textOf(message.content);
  const resend = () => {
    if (controller || !(area.value.trim() || mediaOf(message.content).length)) return;
    chat.messages = chat.messages.slice(0, index);
    chat.messages.push({ role: "user", content: withMedia(mediaOf(message.content), area.value.trim()) });
    answer();
  };
  const buttons = element("div", "buttons");
  const cancel = () => {
    views.delete(message); // drawn anew, without the editor
    renderAll();
  };
  buttons.append(button("Cancel", "secondary", cancel), button("Send", "resend", resend));
  editor.append(area, buttons);
  div.querySelector(".content").replaceWith(editor);
  div.querySelector(".footer").hidden = true;
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      resend();
    } else if (e.key === "Escape") cancel();
  });
  area.focus();
}

// --- attachments -------------------------------------------------------------------------------------------------

function showAttached() {
  const box = $("attachments");
  box.replaceChildren(...thumbnails(attached, false).children);
  [...box.children].forEach((e, i) => e.addEventListener("click", () => { attached.splice(i, 1); showAttached(); }));
}

function sizeText(bytes) {
  return bytes < 1 << 20 ? `${Math.ceil(bytes / 1024)} KB` : `${(bytes / (1 << 20)).toFixed(bytes < 10 << 20 ? 1 : 0)} MB`;
}

// Images and videos become parts of the next message; anything else, or a file over the server's limit, is named
// in the notice instead.
function attach(files) {
  const refused = [];
  for (const file of files) {
    const kind = file.type.startsWith("image/") ? "image"
      : file.type.startsWith("video/") || (!file.type && VIDEO_FILES.test(file.name)) ? "video" : null;
    if (!kind) {
      refused.push(`${file.name} is neither an image nor a video`);
      continue;
    }
    if (file.size > LIMITS[kind]) {
      refused.push(`${file.name} is ${sizeText(file.size)}: ${kind}s up to ${sizeText(LIMITS[kind])} are sent`);
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => {
      const part = kind === "video" ? { type: "video_url", video_url: { url: reader.result } }
        : { type: "image_url", image_url: { url: reader.result } };
      attached.push(part);
      showAttached();
    };
    reader.readAsDataURL(file);
  }
  $("notice").textContent = refused.join("; ");
}

// --- settings ----------------------------------------------------------------------------------------------------

const fields = { system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens") };

function showSettings() {
  for (const [name, field] of Object.entries(fields)) field.value = settings[name];
  thinkBox.checked = settings.think;
}

for (const [name, field] of Object.entries(fields)) {
  field.addEventListener("input", () => {
    settings[name] = field.value;
    saveJSON(SETTINGS, settings);
  });
}
thinkBox.addEventListener("change", () => {
  settings.think = thinkBox.checked;
  saveJSON(SETTINGS, settings);
});
$("settings-open").addEventListener("click", () => $("settings").showModal());

// --- wiring ------------------------------------------------------------------------------------------------------

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if ((!text && !attached.length) || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("form").requestSubmit();
  }
});
stopBtn.addEventListener("click", () => controller && controller.abort());
const fileInput = $("file");
const attachButton = $("attach");
attachButton.title = `Attach images (up to ${sizeText(LIMITS.image)}) or videos ` +
  `(up to ${sizeText(LIMITS.video)}); or paste, or drop them here`;
attachButton.addEventListener("click", () => fileInput.click());
fileInput.addEventListener("change", () => { attach(fileInput.files); fileInput.value = ""; });
input.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (files.length) { e.preventDefault(); attach(files); }
});
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dragging");
  attach(e.dataTransfer ? e.dataTransfer.files : []);
});
$("new").addEventListener("click", () => {
  attached = [];
  showAttached();
  if (chat.messages.length || controller) switchTo(null);
});
$("chats-toggle").addEventListener("click", () => document.body.classList.toggle("show-chats"));
// Another tab changed the conversations: list them again, and take this one's new state when idle.
window.addEventListener("storage", (e) => {
  if (!e.key || !e.key.startsWith(CHAT)) return;
  if (e.key === CHAT + chat.id && !controller) chat = loadJSON(e.key, null) || newChat();
  renderAll();
});

showSettings();
renderAll(true);
loadModel();
