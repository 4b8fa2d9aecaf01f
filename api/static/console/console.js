// The admin console's only script (no inline script anywhere: the pages' CSP allows none).
// 1. The at-risk bubble stays live: the retention page's server-sent events (/admin/live).
// 2. A form marked data-confirm asks first; any form is sent once (a double click is one send;
//    the form's idempotency key makes a resend harmless on the server too).
"use strict";

function listenForAtRisk() {
  const bubble = document.getElementById("bubble");
  if (!bubble || !window.EventSource) return;
  const live = new EventSource("/admin/live");
  live.addEventListener("count", (message) => {
    const { count } = JSON.parse(message.data);
    bubble.textContent = String(count);
    bubble.classList.toggle("zero", count === 0);
  });
  // A closed stream (signed out, a deploy): listen again a little later.
  live.onerror = () => { if (live.readyState === EventSource.CLOSED) setTimeout(listenForAtRisk, 3000); };
}

function guardForms() {
  for (const form of document.querySelectorAll("form[method=post]")) {
    form.addEventListener("submit", (event) => {
      if (form.dataset.sent === "1") { event.preventDefault(); return; }
      const question = form.dataset.confirm;
      if (question && !window.confirm(question)) { event.preventDefault(); return; }
      form.dataset.sent = "1";
      for (const button of form.querySelectorAll("button")) button.setAttribute("aria-disabled", "true");
    });
  }
}

document.addEventListener("DOMContentLoaded", () => { listenForAtRisk(); guardForms(); });
