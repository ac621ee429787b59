// custody dashboard: live fleet updates over server-sent events, filters, alarm buttons.
// Plain JavaScript with no dependencies, so nothing is fetched from the internet.
"use strict";

// The fleet table is filtered and paged by the server (thousands of devices stay a small
// page); live updates carry the rows of this page that changed, and the page's device ids
// when they change, which reloads the page.

let clockOffset = 0;  // gateway clock minus this browser's, so ages follow the gateway

function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.floor((Date.now() + clockOffset - ms) / 1000));
  return s < 120 ? s + " s ago" : s < 7200 ? Math.floor(s / 60) + " min ago" : Math.floor(s / 3600) + " h ago";
}

function tickAges() {
  for (const td of document.querySelectorAll('#fleet td[data-f="last_seen"][data-ms]')) {
    const text = ago(Number(td.dataset.ms));
    if (td.textContent !== text) td.textContent = text;
  }
}

function applyFleet(event) {
  const table = document.getElementById("fleet");
  if (!table) return;
  clockOffset = event.now_ms - Date.now();
  if (event.ids) {
    const shown = Array.from(table.tBodies[0].rows, (tr) => tr.dataset.device);
    if (shown.join("\n") !== event.ids.join("\n")) { location.reload(); return; }
  }
  for (const row of event.rows) {
    const tr = document.getElementById("dev-" + row.device_id);
    if (!tr) { location.reload(); return; }  // a device new to this page: the server renders it
    let changed = false;
    for (const td of tr.querySelectorAll("td[data-f]")) {
      if (td.dataset.f === "last_seen") { td.dataset.ms = row.last_seen_ms; continue; }
      const value = String(row[td.dataset.f] ?? "");
      if (td.textContent !== value) { td.textContent = value; changed = true; }
    }
    tr.classList.toggle("online", row.online);
    tr.classList.toggle("offline", !row.online);
    tr.classList.toggle("attention", row.attention);
    if (changed) { tr.classList.remove("changed"); void tr.offsetWidth; tr.classList.add("changed"); }
  }
  tickAges();
}

function live() {
  const table = document.getElementById("fleet");
  if (!table) return;
  clockOffset = Number(table.dataset.now || Date.now()) - Date.now();
  setInterval(tickAges, 1000);
  if (!window.EventSource) return;
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
  if (form) form.elements.state.addEventListener("change", () => form.submit());
  live();
  alarmButtons();
});
