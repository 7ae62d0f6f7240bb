// The status page: redraws itself from status.json and history.json every 2 s.
// Served as /status.js (the page's CSP allows no inline script). Each part of the page has its
// own render function; a new part adds one function and one line in refresh().
"use strict";

const STEPS = ["validate", "prereq", "approval", "window", "backup", "maintenance", "apply", "verify"];
const text = (s) => String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const when = (t) => t ? new Date(t * 1000).toLocaleString() : "–";
const ago = (s) => s < 120 ? Math.round(s) + " s" : s < 7200 ? Math.round(s / 60) + " min" : (s / 3600).toFixed(1) + " h";

function renderGate(st) {
  const gate = document.getElementById("gate");
  let daemon = "";
  if (!st.daemon.running) daemon = " (daemon down)";
  else if (st.daemon.responding === false) daemon = " (daemon not responding)";
  gate.textContent = st.gate + daemon;
  gate.className = "gate " + st.gate;
  document.getElementById("installed").textContent = "installed: " + (st.installed_version || "none");
}

function stepChips(r) {
  const idx = STEPS.indexOf(r.step);
  const result = {};
  for (const t of r.steps || []) result[t.step] = t.result;  // the last attempt of each step
  return STEPS.map((s, i) => {
    let cls = "", title = "not reached";
    if (result[s] === "ok") { cls = "done"; title = "done"; }
    else if (result[s]) { cls = "bad"; title = result[s]; }
    else if (s === r.step && !r.outcome) { cls = r.overdue ? "late" : "now"; title = r.overdue ? "past its time limit" : "running"; }
    else if (i < idx || r.outcome === "succeeded") { cls = "skip"; title = "not needed for this run"; }
    return `<span class="${cls}" title="${title}">${s}</span>`;
  }).join("");
}

function renderRun(st) {
  const box = document.getElementById("run");
  const r = st.run;
  if (!r) { box.innerHTML = "<span class='muted'>no run yet</span>"; return; }
  let html = `<div><b>run ${r.id}</b> ${text(r.archive)} — ${text(r.from_version || "?")} → ${text(r.to_version || "?")}</div>`;
  html += `<div class="steps">${stepChips(r)}</div>`;
  const active = !r.outcome && r.step !== "queued";
  let pct = null;
  if (active) {
    pct = r.progress == null ? null : Math.min(100, r.progress * 100);
    let limit = "";
    if (r.overdue) limit = ` <span class="overdue">overdue by ${ago(r.overdue_seconds)}</span> (its time limit passed at ${when(r.step_deadline)})`;
    else if (r.step_deadline) limit = `, time limit in ${ago(r.step_deadline - st.now)}`;
    html += `<div>step <b>${text(r.step)}</b> for ${ago(st.now - (r.step_started || st.now))}${limit}` +
      (r.progress_message ? ` — ${text(r.progress_message)}` : "") + `</div>`;
    html += `<div class="bar${r.overdue ? " late" : ""}"><div></div></div>` +
      `<div class="muted">${pct == null ? "progress not measurable in this step" : pct.toFixed(0) + " % of this step"}</div>`;
    if (!st.daemon.running) html += `<div class="warn">No daemon is running: this run is not progressing.</div>`;
    else if (st.daemon.responding === false) {
      html += `<div class="warn">The daemon is not responding (its last heartbeat was ${ago(st.daemon.heartbeat_age)} ago): this run is not progressing.</div>`;
    }
  } else {
    html += `<div>outcome: <b>${text(r.outcome || r.step)}</b> ${r.finished ? "at " + when(r.finished) : ""}</div>`;
  }
  html += `<div>platform: ${text(r.platform)}${r.maintenance ? " — <span class='warn'>maintenance ON</span>" : ""}</div>`;
  if (r.downtime != null) html += `<div>downtime: ${r.downtime ? "yes" : "no"} (${text(r.downtime_reason)})</div>`;
  if (r.error) html += `<div class="warn">${text(r.error)}</div>`;
  for (const b of st.blocked_by) {
    html += `<div class="warn">Gate blocked by run ${b.id} (${text(b.outcome)}). After repair: ` +
      `<code>dropgate resolve ${b.id} --note …</code> (or <code>dropgate rollback ${b.id}</code> first).</div>`;
  }
  box.innerHTML = html;
  const bar = box.querySelector(".bar > div");
  if (bar) bar.style.width = (pct == null ? 0 : pct) + "%";  // set through the DOM: no inline style in markup
}

function renderNotes(st) {
  const notes = st.run && st.run.notes;
  document.getElementById("notes-box").hidden = !notes;
  document.getElementById("notes").textContent = notes || "";
}

function renderQueue(st) {
  const screening = st.screening || [];
  const q = st.uploading.map(u => `uploading ${text(u.name)}: ${u.bytes} of ${u.total} bytes`)
    .concat(screening.length ? [`screening ${text(screening[0].name)}` +
      (screening.length > 1 ? ` and ${screening.length - 1} more` : "") + " (taken from the inbox, not yet runs)"] : [])
    .concat(st.queued.map(x => `queued: run ${x.id} ${text(x.archive)}` +
      (x.notes ? `<pre>${text(x.notes)}</pre>` : "")));
  document.getElementById("queue").innerHTML = q.length ? q.join("<br>") : "nothing waiting";
}

function renderAutoUpdate(st) {
  const a = st.auto_update;
  const box = document.getElementById("auto-update");
  if (!a) { box.textContent = "–"; return; }
  let html = `<div><b>${a.enabled ? "ON" : "OFF"}</b> ` +
    (a.set_by ? `(switched by ${text(a.set_by)} at ${when(a.set_at)})` : "(configuration default)") +
    ` — schedule <code>${text(a.schedule)}</code> ${text(a.timezone)}, channel ${text(a.channel)}</div>`;
  if (a.next_check) html += `<div>next check: ${when(a.next_check)}</div>`;
  const c = a.last_check;
  if (c) html += `<div class="${c.result === "failed" ? "warn" : ""}">last check: ${when(c.started)}: ` +
    `${text(c.result || "running")}${c.message ? " — " + text(c.message) : ""}</div>`;
  if (a.available_version) html += `<div>newest applicable version offered: ${text(a.available_version)}</div>`;
  const d = a.download;
  if (d) {
    html += `<div>${d.active ? "downloading" : "paused"} ${text(d.name)}: ${d.bytes} of ${d.total} bytes</div>` +
      `<div class="bar"><div></div></div>`;
  }
  box.innerHTML = html;
  const bar = box.querySelector(".bar > div");
  if (bar) bar.style.width = (d.total ? Math.min(100, d.bytes / d.total * 100) : 0) + "%";  // no inline style in markup
}

function renderWindows(st) {
  const w = st.window;
  document.getElementById("windows-box").hidden = !w;
  if (!w) return;
  const state = w.open ? `open until ${when(w.closes)}` :
    w.next_open ? `closed; the next opens ${when(w.next_open)}` : "closed; none opens within a week";
  document.getElementById("windows").innerHTML =
    `<div>${text(w.windows.join(", "))} (${text(w.timezone)}, for ${text(w.windows_for)} updates): ${state}</div>`;
}

function renderHistory(hist) {
  document.querySelector("#history tbody").innerHTML = hist.map(r =>
    `<tr><td>${r.id}</td><td>${text(r.archive)}</td><td>${text(r.from_version || "?")} → ${text(r.to_version || "?")}</td>` +
    `<td>${text(r.outcome || "(" + r.step + ")")}</td><td>${when(r.finished)}</td></tr>`).join("");
}

function renderEvents(st) {
  // Newest at the bottom, and the box kept scrolled there, unless the reader scrolled up to read.
  const box = document.getElementById("events");
  const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4 || !box.dataset.drawn;
  const events = (st.run && st.run.events) || [];
  box.textContent = events.map(e => `${when(e.ts)}  ${e.step}: ${e.message}`).join("\n")
    + (st.run && st.run.log_tail && st.run.log_tail.length ? "\n\n-- log --\n" + st.run.log_tail.join("\n") : "");
  box.dataset.drawn = "1";
  if (atEnd) box.scrollTop = box.scrollHeight;
}

async function refresh() {
  try {
    const [st, hist] = await Promise.all([fetch("status.json").then(r => r.json()), fetch("history.json").then(r => r.json())]);
    renderGate(st);
    renderRun(st);
    renderNotes(st);
    renderQueue(st);
    renderWindows(st);
    renderAutoUpdate(st);
    renderHistory(hist);
    renderEvents(st);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("updated").textContent = "cannot reach dropgate: " + e;
  }
}

refresh();
setInterval(refresh, 2000);
