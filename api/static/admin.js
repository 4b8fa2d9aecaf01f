"use strict";
// The retention admin page (api/admin_page.py). Served as a file: the page's CSP allows no inline script.
const rows = document.getElementById("rows");
const bubble = document.getElementById("bubble");
const shown = document.getElementById("shown");

function text(value) { return value == null || value === "" ? "—" : String(value); }
function day(iso) { return iso ? new Date(iso).toISOString().slice(0, 10) : "—"; }
function cell(content) { const td = document.createElement("td"); td.textContent = content; return td; }

async function post(path, body) {
  const response = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), credentials: "same-origin" });
  if (!response.ok) throw new Error((await response.json()).detail || response.statusText);
  return response.json();
}

function row(c) {
  const tr = document.createElement("tr");
  tr.dataset.customer = c.customer_id;
  tr.append(cell(c.customer_id));
  const days = cell(c.days_depleted); days.className = "days"; tr.append(days);
  const dunning = document.createElement("td");
  if (c.dunning_status) { const s = document.createElement("span"); s.className = "status " + c.dunning_status; s.textContent = c.dunning_status.replaceAll("_", " "); dunning.append(s); } else { dunning.textContent = "—"; }
  tr.append(dunning);
  tr.append(cell(c.last_payment_failure_at ? day(c.last_payment_failure_at) + " · " + text(c.last_payment_failure) : "—"));
  tr.append(cell(day(c.last_job_at)));
  const follow = document.createElement("td");
  const note = document.createElement("textarea"); note.value = c.note || ""; note.placeholder = "Follow-up note";
  const saveNote = document.createElement("button"); saveNote.className = "small"; saveNote.textContent = "Save note";
  const saved = document.createElement("span"); saved.className = "saved";
  saveNote.onclick = async () => { try { await post(`/admin/data/customers/${encodeURIComponent(c.customer_id)}/note`, { note: note.value }); saved.textContent = "saved"; } catch (e) { saved.textContent = e.message; } };
  const credits = document.createElement("input"); credits.type = "number"; credits.placeholder = "±credits";
  const reason = document.createElement("input"); reason.className = "reason"; reason.placeholder = "reason";
  const adjust = document.createElement("button"); adjust.className = "small"; adjust.textContent = "Adjust";
  // One key per adjustment typed in: a double click or a retry applies it once.
  let adjustmentKey = newKey();
  credits.oninput = reason.oninput = () => { adjustmentKey = newKey(); };
  adjust.onclick = async () => {
    adjust.disabled = true;
    try {
      await post(`/admin/data/customers/${encodeURIComponent(c.customer_id)}/adjustments`, { credits: Number(credits.value), reason: reason.value, idempotency_key: adjustmentKey });
      saved.textContent = "adjusted"; refresh();
    } catch (e) { saved.textContent = e.message; } finally { adjust.disabled = false; }
  };
  const actions = document.createElement("div"); actions.className = "row-actions"; actions.append(saveNote, credits, reason, adjust, saved);
  follow.append(note, actions); tr.append(follow);
  return tr;
}

async function refresh() {
  const response = await fetch("/admin/data/at-risk", { credentials: "same-origin" });
  if (response.status === 401) { location.href = "/admin/login"; return; }
  const data = await response.json();
  showCount(data.count);
  rows.replaceChildren(...(data.customers.length ? data.customers.map(row) : [Object.assign(document.createElement("tr"), { innerHTML: '<td colspan="6" class="empty">Nobody has been out of credits that long.</td>' })]));
  shown.textContent = data.customers.length < data.count ? `Showing the ${data.customers.length} longest of ${data.count}.` : "";
}

function showCount(count) {
  bubble.textContent = count;
  bubble.classList.toggle("zero", count === 0);
}

function newKey() {
  return (crypto.randomUUID ? crypto.randomUUID() : Date.now().toString(36) + Math.random().toString(36).slice(2)).replaceAll(/[^A-Za-z0-9-]/g, "");
}

function listen() {
  const live = new EventSource("/admin/live");
  live.addEventListener("count", (message) => {
    const { count } = JSON.parse(message.data);
    showCount(count);
    refresh();
  });
  // A closed stream (signed out, a deploy): check the session, then listen again.
  live.onerror = () => { if (live.readyState === EventSource.CLOSED) { setTimeout(() => { refresh(); listen(); }, 3000); } };
}
// Who is on the list can change while the count stays the same: refresh it now and then too.
setInterval(refresh, 30000);
listen();
refresh();
