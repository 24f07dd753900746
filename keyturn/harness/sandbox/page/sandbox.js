// The keyturn Slack sandbox: what one workspace member sees, drawn from /sandbox/state.
// Everything is built with createElement and textContent, never from HTML strings: a
// command carrying <script> or <img onerror> shows as the text it is.
"use strict";

const BOT_NAME = "keyturn";
const POLL_MS = 700;
const EMOJI = {
  x: "❌", white_check_mark: "✅", warning: "⚠️", hourglass: "⌛", no_entry_sign: "🚫",
  lock: "🔒", key: "🔑", clock3: "🕒", bell: "🔔", rotating_light: "🚨", wave: "👋",
  heavy_check_mark: "✔️", information_source: "ℹ️", stopwatch: "⏱️", hourglass_flowing_sand: "⏳",
};

const state = {
  me: new URLSearchParams(location.search).get("as") || "",
  data: null,
  version: -1,
  selected: "",
  seen: {},
  modalKey: "",
};

// ------------------------------------------------------------------ DOM helpers

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function toast(text) {
  const box = document.getElementById("toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 4000);
}

async function post(path, body) {
  const resp = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  let answer = null;
  try { answer = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const message = answer && answer.error ? answer.error.message : `HTTP ${resp.status}`;
    throw new Error(message);
  }
  return answer;
}

// ------------------------------------------------------------------ mrkdwn

function decode(text) {
  return text.replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&amp;/g, "&");
}

function userName(id) {
  if (id === state.data?.bot_user) return BOT_NAME;
  const user = (state.data?.users || []).find((u) => u.id === id);
  return user ? user.name : id;
}

function emojify(text) {
  return text.replace(/:([a-z0-9_+-]+):/g, (all, name) => EMOJI[name] || all);
}

// `code` | <special> | *bold* | _italic_ | ~strike~ | :emoji:
const INLINE = new RegExp(
  [
    "`([^`\\n]+)`",
    "<([^<>\\n]+)>",
    "(?<![\\w*])\\*(?=\\S)([^*\\n]*?\\S)\\*(?![\\w*])",
    "(?<![\\w_])_(?=\\S)([^_\\n]*?\\S)_(?![\\w_])",
    "(?<![\\w~])~(?=\\S)([^~\\n]*?\\S)~(?![\\w~])",
    ":([a-z0-9_+-]+):",
  ].join("|"),
  "g",
);

function special(inner) {
  const bar = inner.indexOf("|");
  const target = bar < 0 ? inner : inner.slice(0, bar);
  const label = bar < 0 ? "" : decode(inner.slice(bar + 1));
  if (target.startsWith("@")) return el("span", "mention", "@" + (label || userName(target.slice(1))));
  if (target.startsWith("#")) return el("span", "mention", "#" + (label || target.slice(1)));
  if (target.startsWith("!")) {
    const word = target.slice(1).split("^")[0];
    return el("span", "mention", label || "@" + word);
  }
  if (/^(https?:|mailto:)/i.test(target)) {
    const link = el("a", "", label || decode(target));
    link.href = decode(target);
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    return link;
  }
  return document.createTextNode(decode("<" + inner + ">"));
}

function inline(text, into) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) into.append(decode(text.slice(last, m.index)));
    if (m[1] !== undefined) into.append(el("code", "", decode(m[1])));
    else if (m[2] !== undefined) into.append(special(m[2]));
    else if (m[6] !== undefined) into.append(EMOJI[m[6]] || m[0]);
    else {
      const node = el(m[3] !== undefined ? "b" : m[4] !== undefined ? "i" : "s");
      inline(m[3] ?? m[4] ?? m[5], node);
      into.append(node);
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) into.append(decode(text.slice(last)));
}

function mrkdwn(text) {
  const out = el("div", "text");
  const parts = text.split("```");
  parts.forEach((part, i) => {
    const fenced = i % 2 === 1 && i < parts.length - 1;
    if (fenced) out.append(el("pre", "", decode(part.replace(/^\n/, ""))));
    else inline(i % 2 === 1 ? "```" + part : part, out);
  });
  return out;
}

function textObject(obj) {
  if (!obj) return el("div", "text");
  if (obj.type === "mrkdwn") return mrkdwn(obj.text || "");
  return el("div", "text", obj.emoji === false ? obj.text : emojify(obj.text || ""));
}

// ------------------------------------------------------------------ Block Kit

function button(element, where) {
  const style = ["primary", "danger"].includes(element.style) ? " " + element.style : "";
  const node = el("button", "sk" + style);
  node.type = "button";
  node.textContent = emojify(element.text?.text || "");
  node.dataset.actionId = element.action_id || "";
  node.addEventListener("click", () => act(where, element, node));
  return node;
}

function interactive(element, where) {
  if (element.type === "button") return button(element, where);
  return el("span", "unsupported", `[${element.type}]`);
}

function block(b, where) {
  switch (b.type) {
    case "header":
      return el("div", "block header-block", emojify(b.text?.text || ""));
    case "section": {
      const box = el("div", "block");
      const main = el("div");
      if (b.text) main.append(textObject(b.text));
      if (b.fields) {
        const fields = el("div", "fields");
        for (const f of b.fields) fields.append(textObject(f));
        main.append(fields);
      }
      if (b.accessory) {
        box.className += " section-with-accessory";
        box.append(main, interactive(b.accessory, where));
      } else box.append(main);
      return box;
    }
    case "context": {
      const box = el("div", "block context");
      (b.elements || []).forEach((e, i) => {
        if (i) box.append("   ");
        if (e.type === "image") box.append(e.alt_text || "");
        else box.append(...textObject(e).childNodes);
      });
      return box;
    }
    case "actions": {
      const box = el("div", "block actions");
      for (const e of b.elements || []) box.append(interactive(e, where));
      return box;
    }
    case "divider":
      return el("hr", "divider");
    case "rich_text": {
      const words = [];
      for (const part of b.elements || []) for (const e of part.elements || []) words.push(e.text || "");
      return el("div", "block text", words.join(""));
    }
    default:
      return el("div", "block unsupported", `[${b.type} block]`);
  }
}

function blocks(list, where) {
  const box = el("div", "blocks");
  for (const b of list || []) box.append(block(b, where));
  return box;
}

// ------------------------------------------------------------------ messages

function time(ts) {
  const when = new Date(parseFloat(ts) * 1000);
  return when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function message(m, extraClass) {
  const row = el("div", "message" + (extraClass ? " " + extraClass : ""));
  row.dataset.ts = m.ts;
  const who = m.user ? userName(m.user) : BOT_NAME;
  row.append(el("div", "avatar", who.slice(0, 1).toUpperCase()));
  const body = el("div", "body");
  const line = el("div");
  line.append(el("span", "sender", who));
  if (who === BOT_NAME) line.append(el("span", "app-tag", "APP"));
  line.append(el("span", "time", time(m.ts)));
  if (extraClass === "ephemeral") line.append(el("span", "only-you", " · Only visible to you"));
  body.append(line);
  if (m.blocks && m.blocks.length) body.append(blocks(m.blocks, { ts: m.ts }));
  else body.append(mrkdwn(m.text || ""));
  row.append(body);
  return row;
}

function conversation(c) {
  const stream = document.createDocumentFragment();
  const top = c.messages.filter((m) => !m.thread_ts || m.thread_ts === m.ts);
  const mine = state.data.ephemerals
    .filter((e) => e.channel === c.id)
    .map((e) => ({ ...e, ephemeral: true }));
  const all = [...top, ...mine].sort((a, b) => parseFloat(a.ts) - parseFloat(b.ts));
  if (!all.length) stream.append(el("p", "empty", "Nothing here yet."));
  for (const m of all) {
    if (m.ephemeral) {
      stream.append(message({ ...m, user: "" }, "ephemeral"));
      continue;
    }
    const row = message(m);
    const replies = c.messages.filter((r) => r.thread_ts === m.ts && r.ts !== m.ts);
    if (replies.length) {
      const thread = el("div", "replies");
      thread.dataset.thread = m.ts;
      for (const r of replies) thread.append(message(r));
      row.querySelector(".body").append(
        el("div", "replies-label", `${replies.length} repl${replies.length === 1 ? "y" : "ies"}`),
        thread,
      );
    }
    stream.append(row);
  }
  return stream;
}

// ------------------------------------------------------------------ modal

function modalInput(b) {
  const box = el("div", "input-block");
  box.dataset.blockId = b.block_id;
  const id = `input-${b.block_id}`;
  const label = el("label", "", b.label?.text || "");
  label.htmlFor = id;
  box.append(label);
  const e = b.element || {};
  let control;
  if (e.type === "static_select") {
    control = el("select");
    control.append(el("option", "", e.placeholder?.text || "Choose…"));
    control.firstChild.value = "";
    const options = e.options || (e.option_groups || []).flatMap((g) => g.options || []);
    for (const o of options) {
      const option = el("option", "", o.text?.text || o.value);
      option.value = o.value;
      control.append(option);
    }
    if (e.initial_option) control.value = e.initial_option.value;
  } else {
    control = el(e.multiline ? "textarea" : "input");
    if (e.max_length) control.maxLength = e.max_length;
    if (e.placeholder) control.placeholder = e.placeholder.text;
    if (e.initial_value) control.value = e.initial_value;
  }
  control.id = id;
  control.name = b.block_id;
  box.append(control);
  if (b.hint) box.append(el("div", "hint", b.hint.text));
  box.append(el("div", "error"));
  return box;
}

function showModal(view) {
  const overlay = document.getElementById("modal");
  const key = view ? view.id + JSON.stringify([view.title, view.blocks, view.submit]) : "";
  if (key === state.modalKey) return;  // the same modal: keep what the person typed
  state.modalKey = key;
  overlay.replaceChildren();
  overlay.hidden = !view;
  if (!view) return;
  const dialog = el("form", "dialog");
  dialog.setAttribute("role", "dialog");
  dialog.setAttribute("aria-modal", "true");
  dialog.setAttribute("aria-label", view.title?.text || "Modal");
  dialog.append(el("h1", "", view.title?.text || ""));
  const content = el("div", "content");
  for (const b of view.blocks || []) {
    content.append(b.type === "input" ? modalInput(b) : block(b, { viewId: view.id }));
  }
  const footer = el("footer");
  const cancel = el("button", "sk", view.close?.text || "Cancel");
  cancel.type = "button";
  cancel.addEventListener("click", () => closeModal(view));
  footer.append(cancel);
  if (view.submit) {
    const submit = el("button", "sk primary", view.submit.text);
    submit.type = "submit";
    footer.append(submit);
  }
  dialog.append(content, footer);
  dialog.addEventListener("submit", (event) => {
    event.preventDefault();
    submitModal(view, dialog);
  });
  overlay.append(dialog);
  dialog.querySelector("textarea, input, select")?.focus();
}

function showErrors(dialog, errors) {
  for (const box of dialog.querySelectorAll(".input-block")) {
    box.querySelector(".error").textContent = errors[box.dataset.blockId] || "";
  }
}

async function submitModal(view, dialog) {
  const values = {};
  const missing = {};
  for (const b of (view.blocks || []).filter((x) => x.type === "input")) {
    const value = dialog.querySelector(`[name="${CSS.escape(b.block_id)}"]`).value;
    values[b.block_id] = value;
    if (!b.optional && !value.trim()) missing[b.block_id] = "Please fill out this field.";
  }
  showErrors(dialog, missing);
  if (Object.keys(missing).length) return;
  for (const b of dialog.querySelectorAll("button")) b.disabled = true;
  try {
    const answer = await post("/sandbox/submit", { view_id: view.id, user: state.me, values });
    const action = answer.response ? JSON.parse(answer.response) : {};
    if (answer.status !== 200) toast(`keyturn did not take the form (HTTP ${answer.status})`);
    else if (action.response_action === "errors") showErrors(dialog, action.errors || {});
  } catch (error) {
    toast(`The sandbox could not send that: ${error.message}`);
  } finally {
    for (const b of dialog.querySelectorAll("button")) b.disabled = false;
    refresh();
  }
}

async function closeModal(view) {
  try {
    await post("/sandbox/close", { view_id: view.id, user: state.me });
  } finally {
    refresh();
  }
}

// ------------------------------------------------------------------ actions

async function act(where, element, node) {
  node.disabled = true;
  const body = { action_id: element.action_id, user: state.me };
  if (where.viewId) body.view_id = where.viewId;
  else body.ts = where.ts;
  try {
    const answer = await post("/sandbox/click", body);
    if (answer.status !== 200) toast(`keyturn did not answer the click (HTTP ${answer.status})`);
  } catch (error) {
    toast(`The sandbox could not send that click: ${error.message}`);
  } finally {
    node.disabled = false;
    refresh();
  }
}

async function sendCommand(event) {
  event.preventDefault();
  const input = document.getElementById("command");
  const match = /^\/keyturn(?:\s+|$)(.*)$/s.exec(input.value.trim());
  if (!match) {
    toast("The sandbox sends /keyturn commands, e.g. /keyturn help");
    return;
  }
  // typed in a channel: answered there; elsewhere (a DM, the Home tab): in the first channel
  const channels = (state.data?.conversations || []).filter((c) => c.kind === "channel");
  const current = channels.find((c) => c.id === state.selected) || channels[0];
  const channel = current ? current.id : "CGENERAL";
  input.value = "";
  try {
    const answer = await post("/sandbox/command", { text: match[1], user: state.me, channel });
    if (answer.status === 404) toast("The bot has no /keyturn command yet");
    else if (answer.status !== 200) toast(`keyturn did not answer /keyturn (HTTP ${answer.status})`);
  } catch (error) {
    toast(`The sandbox could not send that: ${error.message}`);
  }
  refresh();
}

// ------------------------------------------------------------------ the page

function sidebarItem(list, id, label, count) {
  const item = el("li", id === state.selected ? "selected" : "", label);
  item.dataset.id = id;
  if (count > 0 && id !== state.selected) {
    item.classList.add("unread");
    item.append(el("span", "count", String(count)));
  }
  item.addEventListener("click", () => {
    state.selected = id;
    if (id === "home") post("/sandbox/home", { user: state.me }).catch((e) => toast(e.message));
    render();
  });
  list.append(item);
}

function channelName(c) {
  return c.kind === "dm" ? BOT_NAME : "#" + (c.name || c.id);
}

function render() {
  const data = state.data;
  const picker = document.getElementById("user");
  picker.replaceChildren();
  for (const u of data.users) {
    const option = el("option", "", u.name);
    option.value = u.id;
    picker.append(option);
  }
  picker.value = state.me;
  const me = data.users.find((u) => u.id === state.me);
  document.getElementById("title").textContent = me && me.title ? me.title : "";

  const ids = data.conversations.map((c) => c.id);
  ids.push("home");
  if (!ids.includes(state.selected)) state.selected = ids[0] || "";
  const lists = { channel: document.getElementById("channels"), dm: document.getElementById("dms") };
  for (const list of [...Object.values(lists), document.getElementById("apps")]) list.replaceChildren();
  for (const c of data.conversations) {
    if (c.id === state.selected) state.seen[c.id] = c.messages.length;
    sidebarItem(lists[c.kind], c.id, channelName(c), c.messages.length - (state.seen[c.id] || 0));
  }
  sidebarItem(document.getElementById("apps"), "home", `${BOT_NAME} · Home`, 0);

  const heading = document.getElementById("heading");
  const stream = document.getElementById("stream");
  const atBottom = stream.scrollHeight - stream.scrollTop - stream.clientHeight < 40;
  const current = data.conversations.find((c) => c.id === state.selected);
  if (state.selected === "home") {
    heading.textContent = `${BOT_NAME} · Home`;
    stream.replaceChildren(
      data.home
        ? blocks(data.home.blocks, { viewId: data.home.id })
        : el("p", "empty", "Opening the Home tab…"),
    );
  } else if (current) {
    heading.textContent = channelName(current);
    stream.replaceChildren(conversation(current));
  } else {
    heading.textContent = "";
    stream.replaceChildren(el("p", "empty", "No conversations yet: cards appear as the bot posts them."));
  }
  if (atBottom) stream.scrollTop = stream.scrollHeight;
  showModal(data.modal);
}

async function refresh(force) {
  const since = force ? "" : `&since=${state.version}`;
  try {
    const resp = await fetch(`/sandbox/state?user=${encodeURIComponent(state.me)}${since}`);
    const data = await resp.json();
    if (data.unchanged) return;
    if (!state.me) state.me = data.default_user || (data.users[0] || {}).id || "";
    if (data.me !== state.me) return refresh(true);  // switched while this was in flight
    state.data = data;
    state.version = data.version;
    render();
  } catch (error) {
    toast("The sandbox is not answering: is keyturn dev still running?");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("user").addEventListener("change", (event) => {
    state.me = event.target.value;
    state.seen = {};
    const url = new URL(location.href);
    url.searchParams.set("as", state.me);
    history.replaceState(null, "", url);
    refresh(true);
  });
  document.getElementById("composer").addEventListener("submit", sendCommand);
  document.addEventListener("keydown", (event) => {
    const view = state.data?.modal;
    if (event.key === "Escape" && view) closeModal(view);
  });
  refresh(true);
  setInterval(refresh, POLL_MS);
});
