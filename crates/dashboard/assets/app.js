// muster dashboard: live view of the registry over server-sent events.
// Everything from the network is rendered with textContent, never as HTML.
"use strict";

(function () {
  const MAX_EVENTS = 300;
  const SERVICE_EVENTS = 10;
  const ACTIVITY_EVENTS = 120;
  const STATUS_EVERY_MS = 5000;

  const state = {
    services: new Map(), // service name -> Map(instance id -> instance)
    events: [], // oldest first
    leases: new Map(), // lease (hex) -> { left: ms | null, at: performance.now() }
    skew: 0, // Date.now() - the server's clock
    revision: null,
    open: new Set(), // services whose event list is expanded
    flash: new Set(), // "service/id" rows to highlight once
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // ---- formatting -------------------------------------------------------

  function fmtDuration(ms) {
    if (ms === null || ms === undefined || !isFinite(ms)) return "—";
    let s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return s + "s";
    let m = Math.floor(s / 60);
    s %= 60;
    if (m < 60) return m + "m " + s + "s";
    let h = Math.floor(m / 60);
    m %= 60;
    if (h < 24) return h + "h " + m + "m";
    const d = Math.floor(h / 24);
    h %= 24;
    return d + "d " + h + "h";
  }

  function fmtBytes(n) {
    if (typeof n !== "number") return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function fmtClock(ms) {
    const d = new Date(ms);
    const p = (x) => String(x).padStart(2, "0");
    return p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  function fmtCount(n) {
    return typeof n === "number" ? n.toLocaleString("en-US") : "—";
  }

  // ---- filters ----------------------------------------------------------

  const filters = { service: "", zone: "", status: "" };

  function readHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    filters.service = params.get("service") || "";
    filters.zone = params.get("zone") || "";
    filters.status = params.get("status") || "";
    $("filter-service").value = filters.service;
    $("filter-status").value = filters.status;
  }

  function writeHash() {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(filters)) if (v) params.set(k, v);
    const hash = params.toString();
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
  }

  const NO_ZONE = "\u0000none";

  function zoneOf(inst) {
    return inst.zone ? inst.zone : NO_ZONE;
  }

  function serviceMatches(name) {
    return !filters.service || name.toLowerCase().includes(filters.service.toLowerCase());
  }

  function instanceMatches(inst) {
    if (filters.zone && zoneOf(inst) !== filters.zone) return false;
    if (filters.status && inst.status !== filters.status) return false;
    return true;
  }

  function eventMatches(ev) {
    if (!serviceMatches(ev.service)) return false;
    if (filters.zone && (ev.zone ? ev.zone : NO_ZONE) !== filters.zone) return false;
    return true;
  }

  // ---- state updates ----------------------------------------------------

  function serverNow(msg) {
    if (typeof msg.now_ms === "number") state.skew = Date.now() - msg.now_ms;
  }

  function noteLease(inst) {
    if (inst.lease && inst.lease_left_ms !== undefined) {
      state.leases.set(inst.lease, { left: inst.lease_left_ms, at: performance.now() });
    }
  }

  function upsert(inst) {
    let svc = state.services.get(inst.service);
    if (!svc) {
      svc = new Map();
      state.services.set(inst.service, svc);
    }
    svc.set(inst.id, inst);
    noteLease(inst);
  }

  function remove(service, id) {
    const svc = state.services.get(service);
    if (!svc) return;
    svc.delete(id);
    if (svc.size === 0) state.services.delete(service);
  }

  function addEvents(events) {
    for (const ev of events) state.events.push(ev);
    if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
  }

  function setRevision(rev) {
    if (typeof rev === "number") {
      state.revision = rev;
      $("revision").textContent = fmtCount(rev);
    }
  }

  function onSnapshot(msg) {
    serverNow(msg);
    state.services.clear();
    state.events = [];
    if (msg.prefix) $("prefix").textContent = msg.prefix;
    for (const svc of msg.services || []) for (const inst of svc.instances) upsert(inst);
    addEvents(msg.events || []);
    setRevision(msg.revision);
    render();
  }

  function onChanges(msg) {
    serverNow(msg);
    for (const r of msg.removes || []) remove(r.service, r.id);
    for (const inst of msg.upserts || []) {
      upsert(inst);
      state.flash.add(inst.service + "/" + inst.id);
    }
    addEvents(msg.events || []);
    setRevision(msg.revision);
    render();
    statusSoon();
  }

  function onLeases(msg) {
    serverNow(msg);
    const now = performance.now();
    for (const [lease, left] of Object.entries(msg.leases || {})) {
      state.leases.set(lease, { left: left, at: now });
    }
    // Propagation to this dashboard, per service (watch event to table).
    const apply = msg.apply || {};
    for (const card of document.querySelectorAll("article.service")) {
      showApply(card.querySelector(".badge-apply"), apply[card.dataset.service]);
    }
    state.apply = apply;
    tick();
  }

  // ---- rendering --------------------------------------------------------

  function leaseLeft(lease) {
    const l = state.leases.get(lease);
    if (!l) return undefined;
    if (l.left === null) return null;
    return Math.max(0, l.left - (performance.now() - l.at));
  }

  function paintLease(td) {
    const lease = td.dataset.lease;
    td.classList.remove("lease-low", "lease-gone", "none");
    if (!lease) {
      td.textContent = "no lease";
      td.classList.add("none");
      td.title = "The key has no lease: it stays until deleted.";
      return;
    }
    td.title = "lease " + lease;
    const left = leaseLeft(lease);
    if (left === undefined) {
      td.textContent = "…";
      td.classList.add("none");
    } else if (left === null) {
      td.textContent = "expired";
      td.classList.add("lease-gone");
    } else {
      td.textContent = (left / 1000).toFixed(left < 10000 ? 1 : 0) + "s";
      if (left < 3000) td.classList.add("lease-low");
    }
  }

  function paintAge(td) {
    const born = Number(td.dataset.born);
    if (!td.dataset.born || !isFinite(born)) {
      td.textContent = "—";
      td.classList.add("none");
      td.title = "Registered by a program that does not record the time.";
      return;
    }
    td.textContent = fmtDuration(Date.now() - state.skew - born);
    td.title = "registered " + new Date(born).toLocaleString();
  }

  function tick() {
    for (const td of document.querySelectorAll("td[data-lease], td.lease")) paintLease(td);
    for (const td of document.querySelectorAll("td.age")) paintAge(td);
  }

  function instanceRow(inst) {
    const tr = el("tr");
    tr.dataset.key = inst.service + "/" + inst.id;
    tr.dataset.status = inst.status;
    if (state.flash.has(tr.dataset.key)) tr.classList.add("flash");

    const id = el("td", "id", inst.id);
    id.title = inst.id + (inst.tags && inst.tags.length ? " · " + inst.tags.join(", ") : "");
    for (const tag of inst.tags || []) id.appendChild(el("span", "tag", tag));
    tr.appendChild(id);

    const addr = el("td", "addr", inst.addr);
    addr.title = inst.addr;
    tr.appendChild(addr);

    tr.appendChild(inst.zone ? el("td", "zone", inst.zone) : el("td", "zone none", "—"));
    tr.appendChild(inst.version ? el("td", "version", inst.version) : el("td", "version none", "—"));
    tr.appendChild(el("td", "num weight", inst.weight));

    const st = el("td", "state");
    st.appendChild(el("span", "badge st-" + inst.status, inst.status));
    tr.appendChild(st);

    const lease = el("td", "num lease");
    if (inst.lease) lease.dataset.lease = inst.lease;
    paintLease(lease);
    tr.appendChild(lease);

    const age = el("td", "num age");
    if (inst.registered_at_ms !== null && inst.registered_at_ms !== undefined) {
      age.dataset.born = String(inst.registered_at_ms);
    }
    paintAge(age);
    tr.appendChild(age);
    return tr;
  }

  function eventItem(ev, withService) {
    const li = el("li", "event");
    li.dataset.kind = ev.kind;
    const t = el("time", null, fmtClock(ev.at_ms));
    t.dateTime = new Date(ev.at_ms).toISOString();
    t.title = new Date(ev.at_ms).toLocaleString() + " · revision " + ev.revision;
    li.appendChild(t);
    li.appendChild(el("span", "kind k-" + ev.kind, ev.kind));
    const who = el("span", "who");
    if (withService) who.appendChild(el("span", "svc", ev.service + "/"));
    who.appendChild(document.createTextNode(ev.id));
    if (!withService && ev.addr) who.appendChild(el("span", "detail", ev.addr + (ev.version ? " · " + ev.version : "")));
    who.title = ev.service + "/" + ev.id + (ev.addr ? " at " + ev.addr : "");
    li.appendChild(who);
    return li;
  }

  function showApply(node, a) {
    if (!node) return;
    if (!a) {
      node.textContent = "";
      node.hidden = true;
      return;
    }
    node.hidden = false;
    const ms = a.p99_ms < 0.1 ? a.p99_ms.toFixed(3) : a.p99_ms < 10 ? a.p99_ms.toFixed(2) : a.p99_ms.toFixed(0);
    node.textContent = "p99 " + ms + " ms";
    node.title =
      "Propagation to this dashboard: watch event received to table updated, p99 over " +
      a.count + (a.count === 1 ? " change" : " changes");
  }

  function setBadge(node, n, word) {
    node.textContent = n + " " + word;
    node.classList.toggle("zero", n === 0);
  }

  function renderZones() {
    const select = $("filter-zone");
    const zones = new Set();
    for (const svc of state.services.values()) for (const inst of svc.values()) zones.add(zoneOf(inst));
    if (filters.zone) zones.add(filters.zone);
    const sorted = [...zones].sort();
    const current = [...select.options].slice(1).map((o) => o.value);
    if (current.join("\n") !== sorted.join("\n")) {
      while (select.options.length > 1) select.remove(1);
      for (const z of sorted) {
        const opt = el("option", null, z === NO_ZONE ? "(no zone)" : z);
        opt.value = z;
        select.appendChild(opt);
      }
    }
    select.value = filters.zone;
  }

  function render() {
    renderZones();
    const container = $("services");
    const tpl = $("tpl-service");
    const names = [...state.services.keys()].sort();
    const byService = new Map();
    for (const ev of state.events) {
      let list = byService.get(ev.service);
      if (!list) byService.set(ev.service, (list = []));
      list.push(ev);
    }

    const frag = document.createDocumentFragment();
    let shownServices = 0;
    let shownInstances = 0;
    let serving = 0;
    let draining = 0;
    for (const name of names) {
      if (!serviceMatches(name)) continue;
      const instances = [...state.services.get(name).values()].sort((a, b) =>
        a.id < b.id ? -1 : a.id > b.id ? 1 : 0,
      );
      const visible = instances.filter(instanceMatches);
      if (visible.length === 0 && (filters.zone || filters.status)) continue;
      shownServices++;
      shownInstances += visible.length;

      const card = tpl.content.firstElementChild.cloneNode(true);
      card.dataset.service = name;
      card.querySelector(".service-name").textContent = name;
      const nServing = instances.filter((i) => i.status === "serving").length;
      const nDraining = instances.length - nServing;
      for (const i of visible) i.status === "serving" ? serving++ : draining++;
      setBadge(card.querySelector(".badge-serving"), nServing, "serving");
      setBadge(card.querySelector(".badge-draining"), nDraining, "draining");
      showApply(card.querySelector(".badge-apply"), (state.apply || {})[name]);

      const tbody = card.querySelector("tbody");
      for (const inst of visible) tbody.appendChild(instanceRow(inst));
      const hidden = instances.length - visible.length;
      if (hidden > 0) {
        const tr = el("tr", "filtered-out");
        const td = el("td", null, hidden + (hidden === 1 ? " instance" : " instances") + " hidden by the filters");
        td.colSpan = 8;
        tr.appendChild(td);
        tbody.appendChild(tr);
      }

      const details = card.querySelector("details");
      const evs = (byService.get(name) || []).slice(-SERVICE_EVENTS).reverse();
      details.querySelector("summary").textContent = "Recent events (" + evs.length + ")";
      const ol = details.querySelector("ol");
      for (const ev of evs) ol.appendChild(eventItem(ev, false));
      details.open = state.open.has(name);
      details.addEventListener("toggle", () => {
        if (details.open) state.open.add(name);
        else state.open.delete(name);
      });
      frag.appendChild(card);
    }
    if (shownServices === 0) {
      const empty = el(
        "div",
        "panel empty",
        state.services.size === 0 ? "No services registered under this prefix." : "No service matches the filters.",
      );
      frag.appendChild(empty);
    }
    container.replaceChildren(frag);
    state.flash.clear();

    const summary = $("summary");
    summary.replaceChildren();
    const part = (n, word) => {
      summary.appendChild(el("b", null, fmtCount(n)));
      summary.appendChild(document.createTextNode(" " + word));
    };
    part(shownServices, shownServices === 1 ? "service" : "services");
    summary.appendChild(document.createTextNode(" · "));
    part(shownInstances, shownInstances === 1 ? "instance" : "instances");
    summary.appendChild(document.createTextNode(" · "));
    part(serving, "serving");
    summary.appendChild(document.createTextNode(" · "));
    part(draining, "draining");

    const activity = $("activity");
    const items = [];
    for (let i = state.events.length - 1; i >= 0 && items.length < ACTIVITY_EVENTS; i--) {
      const ev = state.events[i];
      if (eventMatches(ev)) items.push(eventItem(ev, true));
    }
    activity.replaceChildren(...items);
    $("activity-empty").hidden = items.length > 0;
  }

  // ---- registry status --------------------------------------------------

  let lastStatus = 0;
  let statusTimer = null;

  // After a change, soon (at most once a second), so revision and key
  // counts follow the page.
  function statusSoon() {
    if (statusTimer !== null) return;
    const wait = Math.max(0, 1000 - (performance.now() - lastStatus));
    statusTimer = setTimeout(() => {
      statusTimer = null;
      refreshStatus();
    }, wait);
  }

  async function refreshStatus() {
    lastStatus = performance.now();
    try {
      const resp = await fetch("api/status", { cache: "no-store" });
      if (resp.status === 401) {
        loggedOut(ENDED);
        return;
      }
      const st = await resp.json();
      if (!resp.ok) throw new Error(st.error || resp.statusText);
      $("st-endpoint").textContent = st.endpoint.replace(/^https?:\/\//, "");
      $("st-endpoint").title = st.endpoints.join(", ");
      $("st-leader").textContent = st.leader ? st.leader_name || st.leader : "no leader";
      $("st-leader").title = st.leader
        ? "member " + st.leader + (st.is_leader ? " (the endpoint in use)" : "")
        : "the member has no leader";
      $("st-leader").classList.toggle("bad", !st.leader);
      $("st-revision").textContent = fmtCount(st.revision);
      $("st-keys").textContent = fmtCount(st.keys);
      $("st-keys").title = fmtCount(st.prefix_keys) + " under the prefix";
      $("st-db").textContent =
        fmtBytes(st.db_size) + (st.quota ? " of " + fmtBytes(st.quota) : "");
      $("st-db").title = fmtBytes(st.db_size_in_use) + " in use" +
        (st.quota ? "; writes are refused past the quota" : "");
      const alarms = st.alarms || [];
      $("st-db").classList.toggle("bad", alarms.length > 0);
      $("st-version").textContent = st.version || "—";
      const problems = alarms.map((a) =>
        a === "NOSPACE"
          ? "Alarm NOSPACE: the database passed its space quota; writes are refused until space is freed (delete, compact, defragment) and the alarm is disarmed."
          : "Alarm " + a + ".",
      );
      // Status errors repeat the alarms ("memberID:… alarm:NOSPACE").
      for (const e of st.errors || []) {
        if (!alarms.some((a) => e.includes("alarm:" + a))) problems.push(e);
      }
      if (typeof st.catalog_stale_ms === "number") {
        problems.push(
          "Live updates interrupted for " + fmtDuration(st.catalog_stale_ms) +
            (st.catalog_error ? ": " + st.catalog_error : "") + "; showing the last known state.",
        );
      }
      const errors = problems.join(" · ");
      $("st-error").hidden = !errors;
      $("st-error").textContent = errors;
    } catch (e) {
      $("st-error").hidden = false;
      $("st-error").textContent = "Registry status unavailable: " + e.message;
    }
  }

  // ---- live connection --------------------------------------------------

  function setConn(kind, text) {
    const c = $("conn");
    c.className = "conn conn-" + kind;
    $("conn-text").textContent = text;
  }

  function handler(fn) {
    return (e) => {
      try {
        fn(JSON.parse(e.data));
      } catch (err) {
        console.error("bad event", err);
      }
    };
  }

  // The open stream and timers, while the dashboard is showing.
  const live = { running: false, es: null, timers: [], retry: null };
  const ENDED = "Your session has ended: log in again.";

  function connect() {
    const es = new EventSource("api/events");
    live.es = es;
    es.addEventListener("open", () => setConn("live", "live"));
    es.addEventListener("snapshot", handler(onSnapshot));
    es.addEventListener("changes", handler(onChanges));
    es.addEventListener("leases", handler(onLeases));
    es.addEventListener("error", () => {
      if (live.es !== es) return;
      if (es.readyState === EventSource.CLOSED) {
        setConn("down", "disconnected");
        es.close();
        live.es = null;
        // Refused: perhaps the session ended. Ask before reconnecting.
        reconnectSoon();
      } else {
        setConn("connecting", "reconnecting");
      }
    });
  }

  function reconnectSoon() {
    live.retry = setTimeout(async () => {
      live.retry = null;
      // Reconnects through showDashboard when the session is fine.
      if ((await checkSession(ENDED)) === "error" && live.running) reconnectSoon();
    }, 2000);
  }

  function start() {
    if (live.running) {
      if (!live.es && !live.retry) connect();
      return;
    }
    live.running = true;
    connect();
    refreshStatus();
    live.timers.push(setInterval(refreshStatus, STATUS_EVERY_MS));
  }

  function stop() {
    live.running = false;
    if (live.es) live.es.close();
    live.es = null;
    if (live.retry) clearTimeout(live.retry);
    live.retry = null;
    for (const t of live.timers) clearInterval(t);
    live.timers = [];
    if (statusTimer !== null) clearTimeout(statusTimer);
    statusTimer = null;
    state.services.clear();
    state.events = [];
    state.leases.clear();
    render();
  }

  // ---- login ------------------------------------------------------------

  function showUser(user) {
    $("whoami").hidden = !user;
    $("logout").hidden = !user;
    $("user").textContent = user || "";
  }

  function showLogin(message) {
    stop();
    showUser(null);
    setConn("down", "logged out");
    $("dashboard").hidden = true;
    $("login").hidden = false;
    const error = $("login-error");
    error.hidden = !message;
    error.textContent = message || "";
    $("login-password").value = "";
    $("login-name").focus();
  }

  function showDashboard(user) {
    $("login").hidden = true;
    $("dashboard").hidden = false;
    showUser(user);
    start();
  }

  function loggedOut(message) {
    if (!$("login").hidden) return;
    showLogin(message);
  }

  // "ok" (showing the dashboard), "login" (showing the form, with
  // `message`) or "error".
  async function checkSession(message) {
    let resp;
    try {
      resp = await fetch("api/session", { cache: "no-store" });
    } catch (e) {
      return "error";
    }
    if (resp.status === 401) {
      loggedOut(message);
      return "login";
    }
    if (!resp.ok) return "error";
    try {
      const who = await resp.json();
      showDashboard(who.auth ? who.user : null);
      return "ok";
    } catch (e) {
      return "error";
    }
  }

  async function login(e) {
    e.preventDefault();
    const name = $("login-name").value;
    const password = $("login-password");
    const error = $("login-error");
    const submit = $("login-submit");
    submit.disabled = true;
    error.hidden = true;
    try {
      const resp = await fetch("api/login", {
        method: "POST",
        cache: "no-store",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ name: name, password: password.value }),
      });
      let body = {};
      try {
        body = await resp.json();
      } catch (err) {
        body = {};
      }
      if (!resp.ok) {
        error.textContent = body.error || "Login failed (" + resp.status + ").";
        error.hidden = false;
        password.value = "";
        password.focus();
        return;
      }
      password.value = "";
      showDashboard(body.user || name);
    } catch (err) {
      error.textContent = "Cannot reach the dashboard: " + err.message;
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  }

  async function logout() {
    try {
      await fetch("api/logout", { method: "POST", cache: "no-store" });
    } catch (e) {
      // The session stays on the server until it times out.
    }
    showLogin(null);
  }

  // ---- wiring -----------------------------------------------------------

  function init() {
    readHash();
    // "input" as the user types; "change" also covers a programmatic clear.
    for (const type of ["input", "change"]) {
      $("filter-service").addEventListener(type, (e) => {
        const value = e.target.value.trim();
        if (value === filters.service) return;
        filters.service = value;
        writeHash();
        render();
      });
    }
    $("filter-zone").addEventListener("change", (e) => {
      filters.zone = e.target.value;
      writeHash();
      render();
    });
    $("filter-status").addEventListener("change", (e) => {
      filters.status = e.target.value;
      writeHash();
      render();
    });
    window.addEventListener("hashchange", () => {
      readHash();
      render();
    });
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    render();
    setInterval(tick, 500);
    firstSession();
  }

  // Until the dashboard answers whether a login is needed.
  async function firstSession() {
    if ((await checkSession(null)) === "error") {
      $("st-error").hidden = false;
      $("st-error").textContent = "The dashboard does not answer; retrying.";
      setTimeout(firstSession, 2000);
    }
  }

  init();
})();
