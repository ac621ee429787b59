// custody dashboard: live fleet updates over server-sent events, filters, alarm buttons.
// Plain JavaScript with no dependencies, so nothing is fetched from the internet.
"use strict";

function fleetFilter() {
  const form = document.getElementById("fleet-filters");
  const table = document.getElementById("fleet");
  if (!form || !table) return;
  const q = form.elements.q.value.trim().toLowerCase();
  const state = form.elements.state.value;
  let shown = 0;
  for (const tr of table.tBodies[0].rows) {
    const text = tr.textContent.toLowerCase();
    const ok = (!q || text.includes(q)) &&
      (!state || (state === "online" && tr.classList.contains("online")) ||
       (state === "offline" && tr.classList.contains("offline")) ||
       (state === "recording" && tr.querySelector('[data-f="recording"]').textContent.startsWith("yes")) ||
       (state === "attention" && tr.classList.contains("attention")));
    tr.hidden = !ok;
    if (ok) shown++;
  }
  const count = document.getElementById("fleet-count");
  if (count) count.textContent = shown + " devices";
}

function applyFleet(rows) {
  const table = document.getElementById("fleet");
  if (!table) return;
  for (const row of rows) {
    let tr = document.getElementById("dev-" + row.device_id);
    if (!tr) { location.reload(); return; }  // a new device: the server renders it
    let changed = false;
    for (const td of tr.querySelectorAll("td[data-f]")) {
      const value = String(row[td.dataset.f] ?? "");
      if (td.textContent !== value) { td.textContent = value; changed = true; }
    }
    tr.classList.toggle("online", row.online);
    tr.classList.toggle("offline", !row.online);
    tr.classList.toggle("attention", row.attention);
    if (changed) { tr.classList.remove("changed"); void tr.offsetWidth; tr.classList.add("changed"); }
  }
  fleetFilter();
}

function live() {
  const table = document.getElementById("fleet");
  if (!table || !window.EventSource) return;
  const source = new EventSource(table.dataset.live);
  source.addEventListener("fleet", (e) => applyFleet(JSON.parse(e.data)));
}

function alarmButtons() {
  for (const button of document.querySelectorAll("button[data-alarm]")) {
    button.addEventListener("click", async () => {
      const note = button.dataset.action === "resolve" ? prompt("What was done?") || "" : "";
      const r = await fetch(`/api/v1/alarms/${button.dataset.alarm}/${button.dataset.action}`, {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json"}, body: JSON.stringify({note}),
      });
      if (r.ok) location.reload(); else alert((await r.json()).detail || r.statusText);
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("fleet-filters");
  if (form) {
    form.addEventListener("input", fleetFilter);
    form.addEventListener("submit", (e) => e.preventDefault());
    fleetFilter();
  }
  live();
  alarmButtons();
});
