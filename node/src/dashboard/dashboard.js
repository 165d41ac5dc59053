// The dashboard: reads the admin API with the operator's token, which
// stays in this tab's sessionStorage, and offers only the actions the
// token's role may take. Text from the server is always set as text,
// never as markup.
"use strict";

const API = "/api/v1";
const REFRESH_MS = 10000;
let role = null;
let timer = null;

const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem("smarthost-token") || "";
}

async function api(method, path) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  const response = await fetch(API + path, { method, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || "HTTP " + response.status);
    error.status = response.status;
    throw error;
  }
  return body;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  return td;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : cell(c));
  return tr;
}

function button(label, action, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.addEventListener("click", onClick);
  return b;
}

function age(seconds) {
  if (seconds < 60) return seconds + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min";
  if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
  return Math.floor(seconds / 86400) + " d " + Math.floor((seconds % 86400) / 3600) + " h";
}

function when(ms) {
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

const mayWrite = () => role === "operator" || role === "admin";

function say(text) {
  $("message").textContent = text || "";
}

async function showNodes() {
  const box = $("nodes");
  try {
    const view = await api("GET", "/nodes");
    box.textContent = "";
    const list = document.createElement("ul");
    for (const node of view.live) {
      const li = document.createElement("li");
      li.textContent = node + (node === view.leader ? " (leader)" : "");
      list.appendChild(li);
    }
    for (const node of view.dead) {
      const li = document.createElement("li");
      li.textContent = node + " (not answering)";
      li.className = "error";
      list.appendChild(li);
    }
    box.appendChild(list);
    if (!view.leader) box.appendChild(document.createTextNode("No coordinator leads."));
  } catch (error) {
    box.textContent = error.status === 404 ? "One node on the local spool." : error.message;
  }
}

async function setSuspended(domain, suspend) {
  try {
    await api("POST", "/domains/" + encodeURIComponent(domain) + (suspend ? "/suspend" : "/resume"));
    say("");
  } catch (error) {
    say(domain + ": " + error.message);
  }
  await refresh();
}

async function showQueue() {
  const stats = await api("GET", "/queue");
  const counts = $("counts");
  counts.textContent = "";
  for (const [name, key] of [["messages", "messages"], ["ready", "ready"], ["deferred", "deferred"],
                             ["in flight", "in_flight"], ["pending reports", "pending_reports"]]) {
    counts.appendChild(row([name, cell(stats[key], "num")]));
  }
  for (const [node, n] of Object.entries(stats.in_flight_by_node || {})) {
    counts.appendChild(row(["in flight on " + node, cell(n, "num")]));
  }
  const domains = $("domains");
  domains.textContent = "";
  const names = new Set([...Object.keys(stats.deliveries_by_domain), ...stats.suspended]);
  for (const domain of [...names].sort()) {
    const suspended = stats.suspended.includes(domain);
    const oldest = (stats.oldest_age_by_domain || {})[domain];
    const state = cell(suspended ? "suspended" : "active", suspended ? "suspended" : "");
    const actions = document.createElement("td");
    if (mayWrite()) {
      actions.appendChild(suspended
        ? button("Resume", "resume", () => setSuspended(domain, false))
        : button("Suspend", "suspend", () => setSuspended(domain, true)));
    }
    const tr = row([domain, cell(stats.deliveries_by_domain[domain] || 0, "num"),
                    oldest === undefined ? "" : age(oldest), state, actions]);
    tr.dataset.domain = domain;
    domains.appendChild(tr);
  }
  if (names.size === 0) domains.appendChild(row(["nothing queued"]));
}

async function showSessions() {
  const sessions = await api("GET", "/sessions");
  const body = $("sessions");
  body.textContent = "";
  const now = Date.now();
  for (const s of sessions) {
    body.appendChild(row([s.node, s.client, s.helo, s.user, s.tls ? "yes" : "no",
                          age(Math.max(0, Math.floor((now - s.connected_ms) / 1000))),
                          cell(s.messages, "num")]));
  }
  if (sessions.length === 0) body.appendChild(row(["no sessions"]));
}

function recipients(view) {
  return view.recipients.map((r) => r.address + " (" + r.state + ")").join(", ");
}

async function showBounces() {
  const page = await api("GET", "/messages?sender=" + encodeURIComponent("<>") + "&limit=20");
  const body = $("bounces");
  body.textContent = "";
  for (const m of page.messages) {
    body.appendChild(row([m.id, when(m.received_ms), m.recipients.map((r) => r.address).join(", "),
                          m.recipients.map((r) => r.state).join(", ")]));
  }
  if (page.messages.length === 0) body.appendChild(row(["none"]));
}

async function retry(id) {
  try {
    const done = await api("POST", "/messages/" + id + "/retry");
    say(id + ": " + done.deliveries + " deferred deliveries due now");
  } catch (error) {
    say(id + ": " + error.message);
  }
}

function showFound(messages) {
  const body = $("results");
  body.textContent = "";
  for (const m of messages) {
    const actions = document.createElement("td");
    if (mayWrite()) actions.appendChild(button("Retry", "retry", () => retry(m.id)));
    const tr = row([m.id, when(m.received_ms), m.sender || "<>", recipients(m), actions]);
    tr.dataset.id = m.id;
    body.appendChild(tr);
  }
  if (messages.length === 0) body.appendChild(row(["no message found"]));
}

async function search(event) {
  event.preventDefault();
  const what = $("search").value.trim();
  if (!what) return;
  try {
    let messages;
    if (/^[0-9a-f]{28}$/.test(what)) {
      messages = [await api("GET", "/messages/" + what)];
    } else {
      const filter = what.includes("@") || what === "<>" ? "sender" : "domain";
      const page = await api("GET", "/messages?" + filter + "=" + encodeURIComponent(what) + "&limit=100");
      messages = page.messages;
    }
    say("");
    showFound(messages);
  } catch (error) {
    if (error.status === 404) showFound([]);
    else say(what + ": " + error.message);
  }
}

async function refresh() {
  try {
    // One request at a time: each one checks the token.
    await showQueue();
    await showNodes();
    await showSessions();
    await showBounces();
  } catch (error) {
    if (error.status === 401) return signOut("Signed out: " + error.message);
    say(error.message);
  }
}

async function signIn(event) {
  if (event) event.preventDefault();
  const typed = $("token").value;
  if (typed) sessionStorage.setItem("smarthost-token", typed);
  $("token").value = "";
  try {
    const me = await api("GET", "/whoami");
    role = me.role;
    $("whoami").textContent = (me.name || "open API") + " (" + me.role + ")";
    $("whoami").dataset.role = me.role;
    $("signin-form").hidden = true;
    $("signout").hidden = false;
    $("panels").hidden = false;
    say("");
    await refresh();
    clearInterval(timer);
    timer = setInterval(refresh, REFRESH_MS);
  } catch (error) {
    // At load without a token, a closed API is no news: just sign in.
    const quiet = !event && !typed && error.status === 401;
    signOut(quiet ? "" : error.status === 401 ? "Not signed in: " + error.message : error.message);
  }
}

function signOut(why) {
  sessionStorage.removeItem("smarthost-token");
  clearInterval(timer);
  role = null;
  $("panels").hidden = true;
  $("signin-form").hidden = false;
  $("signout").hidden = true;
  $("whoami").textContent = "";
  delete $("whoami").dataset.role;
  say(typeof why === "string" ? why : "");
}

$("signin-form").addEventListener("submit", signIn);
$("signout").addEventListener("click", () => signOut(""));
$("search-form").addEventListener("submit", search);
// A token from earlier in this tab, or an open API, signs in at once.
signIn();
