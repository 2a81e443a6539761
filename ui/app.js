// The fleet page's logic, plain JavaScript without libraries: it polls the
// read-only API (summary and hosts every REFRESH_MS, an open host's events
// incrementally with ?since=), filters and sorts the hosts in memory, and
// draws only the table rows in view (a virtualised table with a fixed row
// height), so 10,000 hosts scroll and refresh without freezing the page.
// All text is set with textContent, never parsed as HTML.
"use strict";

const API = new URL("../api/v1/", location.href);
const REFRESH_MS = 3000;
const ROW = 28; // px, as --row in style.css
const OVERSCAN = 10;

const state = {
  hosts: [],        // as /api/v1/hosts returns them
  view: [],         // filtered and sorted
  sortKey: "id",
  sortDir: 1,
  query: "",
  attentionOnly: false,
  selected: null,   // host id
  events: [],       // of the selected host
  next: 0,          // event log offset for ?since=
  skew: 0,          // this clock minus the server's, in ms
};

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
};

function duration(secs) {
  if (secs < 60) return `${secs} s`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min`;
  if (secs < 86400) {
    const m = Math.floor((secs % 3600) / 60);
    return `${Math.floor(secs / 3600)} h` + (m ? ` ${m} min` : "");
  }
  return `${Math.floor(secs / 86400)} d ${Math.floor((secs % 86400) / 3600)} h`;
}

function ago(rfc3339) {
  if (!rfc3339) return "-";
  const s = Math.max(0, Math.round((Date.now() - state.skew - Date.parse(rfc3339)) / 1000));
  return `${duration(s)} ago`;
}

function currentState(h) {
  return String(h.state || "").split(",")[0].trim();
}

function openAttempt(h) {
  const a = (h.runtime && h.runtime.attempts) || [];
  const last = a[a.length - 1];
  return last && !last.outcome ? last : null;
}

// What a row says in its Status column, and the class that colours it.
function classify(h) {
  const rt = h.runtime || {};
  if (rt.held) {
    const cls = rt.held.cause === "failed" ? "failed" : "held";
    return { cls, text: `HELD (${rt.held.cause}) ${ago(rt.held.since).replace(" ago", "")}` };
  }
  const a = openAttempt(h);
  if (rt.overdue && a) return { cls: "overdue", text: `OVERDUE ${duration(a.seconds)} (attempt ${a.n})` };
  if (rt.installing) return { cls: "installing", text: a ? `installing ${duration(a.seconds)} (attempt ${a.n})` : "installing" };
  return { cls: "", text: "-" };
}

function prepare(h) {
  const c = classify(h);
  const a = openAttempt(h);
  const macs = String(h.macs || "").split(/\s+/).filter(Boolean);
  h._cls = c.cls;
  h._status = c.text;
  h._macs = macs.join(", ");
  h._seen = h.runtime && h.runtime.last_seen ? h.runtime.last_seen.at : "";
  h._attempt = a;
  h._search = [h.id, h.hostname, h.state, c.text, h.serial, h.uuid, macs.join(" "),
    JSON.stringify(h.metadata || {})].join(" ").toLowerCase();
  return h;
}

const sorters = {
  id: (h) => h.id,
  hostname: (h) => String(h.hostname || ""),
  state: (h) => String(h.state || ""),
  status: (h) => ({ overdue: 0, failed: 1, held: 2, installing: 3 }[h._cls] ?? 4),
  serial: (h) => String(h.serial || ""),
  macs: (h) => h._macs,
  seen: (h) => h._seen,
  attempt: (h) => (h._attempt ? h._attempt.seconds / Math.max(1, h._attempt.deadline_minutes * 60) : -1),
};

// Every word of the query must match; `state:NAME` matches the first
// element of the state chain exactly.
function matches(h, w) {
  if (w.startsWith("state:")) return currentState(h).toLowerCase() === w.slice(6);
  return h._search.includes(w);
}

function refilter() {
  const words = state.query.toLowerCase().split(/\s+/).filter(Boolean);
  let v = state.hosts.filter((h) => words.every((w) => matches(h, w)));
  if (state.attentionOnly) v = v.filter((h) => ["held", "failed", "overdue"].includes(h._cls));
  const key = sorters[state.sortKey];
  const dir = state.sortDir;
  v.sort((a, b) => {
    const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * dir || a.id - b.id;
  });
  state.view = v;
  $("count").textContent = `${v.length} of ${state.hosts.length} hosts`;
  $("spacer").style.height = `${v.length * ROW}px`;
  for (const b of document.querySelectorAll("#head button")) {
    b.classList.toggle("asc", b.dataset.sort === state.sortKey && dir > 0);
    b.classList.toggle("desc", b.dataset.sort === state.sortKey && dir < 0);
  }
  draw();
}

function attemptCell(h) {
  const a = h._attempt;
  const span = el("span");
  if (!a) {
    span.textContent = "-";
    return span;
  }
  const frac = a.seconds / Math.max(1, a.deadline_minutes * 60);
  const bar = el("span", frac >= 1 ? "bar late" : "bar");
  const fill = el("i");
  fill.style.width = `${Math.min(100, Math.round(frac * 100))}%`;
  bar.appendChild(fill);
  span.appendChild(bar);
  span.appendChild(document.createTextNode(
    `${duration(a.seconds)} / ${a.deadline_minutes} min`));
  return span;
}

// Draws the rows in view only.
function draw() {
  const vp = $("viewport");
  const first = Math.max(0, Math.floor(vp.scrollTop / ROW) - OVERSCAN);
  const last = Math.min(state.view.length, Math.ceil((vp.scrollTop + vp.clientHeight) / ROW) + OVERSCAN);
  const rows = $("rows");
  rows.style.transform = `translateY(${first * ROW}px)`;
  const frag = document.createDocumentFragment();
  for (let i = first; i < last; i++) {
    const h = state.view[i];
    const r = el("div", `row grid ${h._cls}`);
    if (h.id === state.selected) r.classList.add("selected");
    r.dataset.id = h.id;
    r.appendChild(el("span", "c-id", h.id));
    r.appendChild(el("span", "c-hostname", h.hostname || "-"));
    r.appendChild(el("span", "c-state", h.state || "-"));
    r.appendChild(el("span", "c-status", h._status));
    r.appendChild(el("span", "c-serial", h.serial || "-"));
    r.appendChild(el("span", "c-macs", h._macs || "-"));
    r.appendChild(el("span", "c-seen", h._seen ? ago(h._seen) : "-"));
    r.appendChild(attemptCell(h));
    frag.appendChild(r);
  }
  rows.replaceChildren(frag);
}

function drawSummary(s) {
  const box = $("summary");
  const chips = [];
  const chip = (cls, label, n, query) => {
    const c = el("button", `chip ${cls}`, label);
    c.dataset.state = label;
    c.appendChild(el("b", null, n));
    c.addEventListener("click", () => setQuery(query));
    chips.push(c);
  };
  chip("", "all", s.hosts, "");
  for (const [name, n] of Object.entries(s.states).sort()) chip("", name, n, `state:${name}`);
  chip("held", "held", s.held, "HELD");
  if (s.held_by_cause.failed) chip("failed", "failed", s.held_by_cause.failed, "HELD (failed)");
  chip("installing", "installing", s.installing, "installing");
  chip("overdue", "overdue", s.overdue, "OVERDUE");
  box.replaceChildren(...chips);
}

function setQuery(q) {
  $("search").value = q;
  state.query = q;
  refilter();
}

async function getJSON(path) {
  const r = await fetch(new URL(path, API), { cache: "no-store", headers: { Accept: "application/json" } });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${(await r.text()).trim()}`);
  return r.json();
}

async function refresh() {
  try {
    const [summary, hosts] = await Promise.all([getJSON("summary"), getJSON("hosts")]);
    state.skew = Date.now() - Date.parse(hosts.generated);
    drawSummary(summary);
    state.hosts = hosts.hosts.map(prepare);
    refilter();
    if (state.selected !== null) {
      try {
        await refreshDetail();
      } catch (e) {
        // The host may have been removed meanwhile: say so in the panel
        // and keep the table refreshing.
        $("detail-title").textContent = `Host ${state.selected}: ${e.message}`;
      }
    }
    $("status").className = "";
    $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    $("status").className = "error";
    $("status").textContent = `cannot refresh: ${e.message}`;
  }
}

function field(dl, name, value) {
  if (value === undefined || value === null || value === "") return;
  dl.appendChild(el("dt", null, name));
  dl.appendChild(el("dd", null, typeof value === "object" ? JSON.stringify(value) : value));
}

function drawDetail(h) {
  $("detail-title").textContent = `Host ${h.id}${h.hostname ? ` (${h.hostname})` : ""}`;
  const dl = $("detail-fields");
  dl.replaceChildren();
  const rt = h.runtime || {};
  field(dl, "State", h.state);
  field(dl, "Status", classify(h).text);
  field(dl, "Serial", h.serial);
  field(dl, "UUID", h.uuid);
  field(dl, "MACs", String(h.macs || "").split(/\s+/).filter(Boolean).join(", "));
  if (rt.last_seen) field(dl, "Last seen", `${rt.last_seen.at} (${ago(rt.last_seen.at)}) ${rt.last_seen.platform || ""} ${rt.last_seen.remote || ""}`);
  if (rt.held) field(dl, "Held", `${rt.held.cause} since ${rt.held.since}: ${rt.held.reason}`);
  const skip = new Set(["id", "hostname", "state", "serial", "uuid", "macs", "runtime", "metadata"]);
  for (const [k, v] of Object.entries(h)) if (!skip.has(k)) field(dl, k, v);
  for (const [k, v] of Object.entries(h.metadata || {})) field(dl, `metadata.${k}`, v);
  const ol = $("attempts");
  ol.replaceChildren();
  for (const a of (rt.attempts || []).slice().reverse()) {
    const li = el("li");
    li.appendChild(el("span", "cause", `#${a.n} ${a.state}`));
    li.appendChild(document.createTextNode(
      ` ${a.outcome || "open"}, ${duration(a.seconds)} of ${a.deadline_minutes} min${a.overdue ? ", OVERDUE" : ""}${a.reason ? `: ${a.reason}` : ""} `));
    li.appendChild(el("time", null, a.started));
    ol.appendChild(li);
  }
}

function drawEvents(fresh) {
  const ol = $("events");
  for (const e of fresh) {
    const li = el("li");
    li.appendChild(el("time", null, e.time));
    li.appendChild(document.createTextNode(" "));
    li.appendChild(el("span", "cause", e.cause));
    const change = e.from === e.to ? ` ${e.to}` : ` ${e.from || "∅"} → ${e.to}`;
    li.appendChild(document.createTextNode(change + (e.detail ? `: ${e.detail}` : "") + (e.remote ? ` (from ${e.remote})` : "")));
    ol.prepend(li);
  }
}

async function refreshDetail() {
  const id = state.selected;
  const d = await getJSON(`hosts/${id}?since=${state.next}`);
  if (id !== state.selected) return;
  if (d.reset) $("events").replaceChildren();
  drawDetail(d.host);
  drawEvents(d.events);
  state.next = d.next;
}

async function openDetail(id) {
  state.selected = id;
  state.next = 0;
  $("events").replaceChildren();
  $("detail").hidden = false;
  if (location.hash !== `#host=${id}`) history.replaceState(null, "", `#host=${id}`);
  draw();
  try {
    await refreshDetail();
  } catch (e) {
    $("detail-title").textContent = `Host ${id}: ${e.message}`;
  }
}

function closeDetail() {
  state.selected = null;
  $("detail").hidden = true;
  history.replaceState(null, "", location.pathname + location.search);
  draw();
}

function init() {
  let pending = 0;
  $("search").addEventListener("input", (e) => {
    clearTimeout(pending);
    pending = setTimeout(() => setQuery(e.target.value), 120);
  });
  $("only-attention").addEventListener("change", (e) => {
    state.attentionOnly = e.target.checked;
    refilter();
  });
  for (const b of document.querySelectorAll("#head button")) {
    b.addEventListener("click", () => {
      if (state.sortKey === b.dataset.sort) state.sortDir = -state.sortDir;
      else { state.sortKey = b.dataset.sort; state.sortDir = 1; }
      refilter();
    });
  }
  let frame = 0;
  $("viewport").addEventListener("scroll", () => {
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; draw(); });
  });
  window.addEventListener("resize", draw);
  $("rows").addEventListener("click", (e) => {
    const row = e.target.closest(".row");
    if (row) openDetail(Number(row.dataset.id));
  });
  $("detail-close").addEventListener("click", closeDetail);
  const m = /^#host=(\d+)$/.exec(location.hash);
  if (m) openDetail(Number(m[1]));
  // One refresh at a time: the next starts REFRESH_MS after one ends.
  const loop = async () => {
    await refresh();
    setTimeout(loop, REFRESH_MS);
  };
  loop();
}

init();
