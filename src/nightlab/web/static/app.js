// nightlab dashboard: live session page (polling, no reload) and approval buttons. No dependencies.
"use strict";
(function () {
  const token = (document.querySelector('meta[name="nightlab-token"]') || {}).content || "";
  const root = (document.querySelector('meta[name="nightlab-root"]') || {}).content || "";  // mount prefix

  async function getText(url) {
    const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (!r.ok) throw new Error(url + ": " + r.status);
    return r.text();
  }

  // ---- live session page -------------------------------------------------------------
  const body = document.body;
  const tag = body.dataset.tag;
  if (tag) {
    let since = parseInt(body.dataset.since || "-1", 10);
    let seen = body.dataset.status + "|" + body.dataset.updated;
    let busy = false;
    async function refresh() {
      const chart = document.getElementById("chart");
      const summary = document.getElementById("summary");
      const table = document.getElementById("exp-table");
      const base = root + "/s/" + encodeURIComponent(tag) + "/fragment/";
      const [c, s] = await Promise.all([getText(base + "chart"), getText(base + "summary")]);
      chart.innerHTML = c;
      summary.innerHTML = s;
      if (table && table.dataset.default === "1") {
        document.getElementById("table").innerHTML = await getText(base + "table");
      }
    }
    async function poll() {
      if (busy) return;
      busy = true;
      try {
        const r = await fetch(root + "/api/sessions/" + encodeURIComponent(tag) + "/experiments?order=asc&limit=500&since=" + since,
                              { credentials: "same-origin", cache: "no-store" });
        if (r.ok) {
          const d = await r.json();
          const state = d.session.status + "|" + d.session.updated_at;
          const changed = d.experiments.length > 0 || state !== seen;
          since = d.cursor;
          seen = state;
          const live = document.getElementById("live");
          if (live) { live.className = "live" + (d.session.status === "running" ? " on" : ""); live.textContent = d.session.status === "running" ? "live" : ""; }
          body.dataset.status = d.session.status;
          if (changed) await refresh();
        }
      } catch (e) { /* the server may be restarting: try again next tick */ }
      busy = false;
    }
    const every = parseInt(body.dataset.poll || "2000", 10);
    setInterval(poll, every);
  }

  // ---- approvals ---------------------------------------------------------------------
  document.addEventListener("click", async function (ev) {
    const b = ev.target.closest("button[data-approved]");
    if (!b) return;
    const card = b.closest(".approval");
    const why = card ? (card.querySelector(".why") || {}).value || "" : "";
    const out = card ? card.querySelector(".result") : null;
    card.querySelectorAll("button").forEach(x => x.disabled = true);
    try {
      const r = await fetch((b.dataset.url || root + "/api/approvals/" + b.dataset.id), {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-Nightlab-Token": token },
        body: JSON.stringify({ approved: b.dataset.approved === "1", why: why }),
      });
      const d = await r.json();
      if (!r.ok) throw new Error(d.detail || r.status);
      card.classList.add("answered", "ap-" + d.status);
      if (out) out.textContent = d.status;
      card.dataset.status = d.status;
    } catch (e) {
      if (out) out.textContent = "failed: " + e.message;
      card.querySelectorAll("button").forEach(x => x.disabled = false);
    }
  });
  if (body.dataset.approvals !== undefined) {
    const q = body.dataset.approvalsSession ? "?session=" + encodeURIComponent(body.dataset.approvalsSession) : "";
    setInterval(async function () {
      try {
        const d = await (await fetch((body.dataset.approvalsUrl || root + "/api/approvals") + q, { credentials: "same-origin", cache: "no-store" })).json();
        const fresh = d.pending.some(a => !document.getElementById("approval-" + a.id));
        const typing = document.activeElement && document.activeElement.classList.contains("why");
        if (fresh && !typing) location.reload();
      } catch (e) { /* try again */ }
    }, Math.max(1000, parseInt(body.dataset.poll || "3000", 10)));
  }
})();
