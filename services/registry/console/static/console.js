// The console's changes: each is a request to the REST API itself (the same routes the
// CLI calls), with the login's cookie and its CSRF token; then the part of the page it
// changed is fetched again. Reads and live updates are htmx's (hx-get, the SSE stream).
(function () {
  "use strict";
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";

  function toast(text, kind) {
    const box = document.getElementById("toasts");
    if (!box) return;
    const t = document.createElement("div");
    t.className = "toast " + (kind || "ok");
    t.textContent = text;
    box.appendChild(t);
    setTimeout(() => t.remove(), kind === "bad" ? 9000 : 3500);
  }

  function confirmed(text) {
    const dialog = document.getElementById("confirm");
    if (!text || !dialog) return Promise.resolve(true);
    dialog.querySelector(".confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
      document.getElementById("confirm-ok").focus();
    });
  }

  // A form's fields as the API's JSON body: checkboxes and data-type="bool" as booleans,
  // a multiple select (or data-type="list") as a list, a file as its text, empty fields left out
  // (the API's defaults apply) unless marked data-keep-empty.
  async function body(form) {
    const out = {};
    for (const el of form.elements) {
      if (!el.name) continue;
      if (el.type === "checkbox") out[el.name] = el.checked;
      else if (el.type === "file") { if (el.files[0]) out[el.name] = await el.files[0].text(); }
      else if (el.type === "select-multiple") out[el.name] = [...el.selectedOptions].map((o) => o.value);
      else if (el.dataset.type === "bool") out[el.name] = el.value === "true";
      else if (el.dataset.type === "list") out[el.name] = el.value.split(/[\s,]+/).filter(Boolean);
      else if (el.value !== "" || el.hasAttribute("data-keep-empty")) out[el.name] = el.value;
    }
    return out;
  }

  // A refused request's errors per row (a CSV import's bad lines), listed under its form.
  function showRows(source, rows) {
    const box = source.dataset.errors && document.querySelector(source.dataset.errors);
    if (!box) return;
    box.replaceChildren(...(rows || []).map((r) => {
      const li = document.createElement("li");
      li.textContent = `line ${r.line}: ${r.error}`;
      return li;
    }));
    box.hidden = !(rows && rows.length);
  }

  // "{imported} devices imported": the answer's fields in the message that says it is done.
  function doneText(source, answer, fallback) {
    const text = source.dataset.done || fallback;
    return text.replace(/\{(\w+)\}/g, (_, k) => (answer && k in answer ? answer[k] : ""));
  }

  function refresh(selector) {
    const el = selector && document.querySelector(selector);
    if (el && el.dataset.src && window.htmx) {
      return htmx.ajax("GET", el.dataset.src, { target: el, swap: "outerHTML" });
    }
    window.location.reload();
  }

  async function call(source, payload) {
    const [method, url] = source.dataset.api.split(" ");
    if (!(await confirmed(source.dataset.confirm))) return;
    const busy = source.tagName === "FORM" ? source.querySelector("button") : source;
    if (busy) busy.disabled = true;
    try {
      const res = await fetch(url, {
        method,
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: method === "DELETE" ? undefined : JSON.stringify(payload),
      });
      const answer = await res.json().catch(() => ({}));
      if (res.status === 401) { window.location.href = "/login"; return; }
      showRows(source, answer.rows);
      if (!res.ok) { toast(answer.error || `${method} ${url}: HTTP ${res.status}`, "bad"); return; }
      toast(doneText(source, answer, `${method} ${url}: done`), "ok");
      if (source.tagName === "FORM" && source.dataset.keep === undefined) source.reset();
      refresh(source.dataset.refresh);
    } catch (err) {
      toast(`${method} ${url}: ${err}`, "bad");
    } finally {
      if (busy) busy.disabled = false;
    }
  }

  document.addEventListener("submit", (ev) => {
    const form = ev.target.closest("form[data-api]");
    if (!form) return;
    ev.preventDefault();
    body(form).then((b) => call(form, b));
  });

  document.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button[data-api]");
    if (!btn || btn.closest("form[data-api]")) return;
    ev.preventDefault();
    call(btn, btn.dataset.body ? JSON.parse(btn.dataset.body) : {});
  });

  // A button that shows or hides a part of the page (a device's edit form).
  document.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button[data-toggle]");
    if (!btn) return;
    const part = document.getElementById(btn.dataset.toggle);
    if (part) part.hidden = !part.hidden;
  });

  // A copyable id: a click selects the whole of it.
  document.addEventListener("click", (ev) => {
    const el = ev.target.closest(".copy");
    if (!el || ev.target.closest("a")) return;
    const range = document.createRange();
    range.selectNodeContents(el);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  });

  // A job (import, commit) that ends while the page is open changed what the page shows
  // (a new version): the page is loaded again once, when it ends.
  const ended = () => new Set([...document.querySelectorAll("#jobs [data-job]:not([data-state='running'])")].map((j) => j.dataset.job));
  let endedAtLoad = ended();
  document.addEventListener("htmx:afterSwap", (ev) => {
    if (ev.target.id !== "jobs" || !ev.target.hasAttribute("data-reload-on-end")) return;
    const now = ended();
    if ([...now].some((id) => !endedAtLoad.has(id))) {
      endedAtLoad = now;
      window.location.reload();
    }
  });

  // A live row that is clicked opens its timeline.
  document.addEventListener("click", (ev) => {
    const row = ev.target.closest("tr.boot[data-mac]");
    if (row && !ev.target.closest("a")) window.location.href = "/console/boots/" + row.dataset.mac;
  });
})();
