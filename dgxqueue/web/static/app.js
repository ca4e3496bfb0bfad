// dgxqueue status page: polls the JSON API and updates the page in place.
// Every value from the server is put into the page with textContent or element properties,
// never parsed as HTML, so a prompt holding markup stays text.
"use strict";
(function () {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const pollMs = parseInt(meta("poll-ms"), 10) || 1500;
  const readOnly = meta("read-only") === "yes";
  const page = document.body.dataset.page;

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  function lookup(data, path) {
    return path.split(".").reduce((v, k) => (v === null || v === undefined ? v : v[k]), data);
  }
  function actionForm(url, label, fields) {
    const form = el("form", null, { method: "post", action: url, class: "inline" });
    const all = { csrf: meta("csrf-token"), next: location.pathname, ...fields };
    for (const [k, v] of Object.entries(all)) form.append(el("input", null, { type: "hidden", name: k, value: v }));
    form.append(el("button", label, { type: "submit" }));
    return form;
  }
  function progressCell(done, total) {
    const cell = el("td");
    if (Number.isInteger(done) && Number.isInteger(total) && total > 0) {
      const bar = el("progress");
      bar.max = total;
      bar.value = done;
      cell.append(bar, " ", el("span", `${done}/${total}`, { class: "muted" }));
    }
    return cell;
  }
  function fixed(n, digits) { return (n === null || n === undefined) ? "-" : Number(n).toFixed(digits); }

  function renderOverview(data) {
    document.querySelectorAll("[data-k]").forEach((node) => {
      const value = lookup(data, node.dataset.k);
      if (value !== undefined) node.textContent = String(value);
    });
    const body = document.querySelector("#models tbody");
    const rows = data.models.map((m) => {
      const tr = el("tr", null, { "data-model": m.model });
      const done = m.finished.completed;
      tr.append(el("td", m.model), el("td", m.pending), el("td", m.processing),
        el("td", m.oldest_due_age_seconds === null ? "-" : `${fixed(m.oldest_due_age_seconds, 0)} s`),
        el("td", `${done["1"]} · ${fixed(done["5"] / 5, 1)} · ${fixed(done["15"] / 15, 1)}`),
        el("td", m.finished.failed["15"]), el("td", m.live_daemons),
        el("td", m.paused ? (m.paused_reason ? `paused: ${m.paused_reason}` : "paused") : "claiming"));
      const last = el("td");
      if (!readOnly) {
        last.append(m.paused ? actionForm("/api/models/resume", "Resume", { model: m.model })
          : actionForm("/api/models/pause", "Pause", { model: m.model }));
      }
      tr.append(last);
      return tr;
    });
    body.replaceChildren(...rows);
    const running = data.running.map((j) => jobRow(j, [j.model_name, j.prompt, j.worker_id || "-"]));
    if (running.length === 0) {
      const tr = el("tr");
      tr.append(el("td", "nothing running", { colspan: "5", class: "muted" }));
      running.push(tr);
    }
    document.querySelector("#running tbody").replaceChildren(...running);
  }

  // A running job's row: its link, the given cells (the prompt's class keeps its line breaks), its bar.
  function jobRow(j, cells) {
    const tr = el("tr", null, { "data-job": j.id });
    const link = el("td");
    link.append(el("a", j.id.slice(0, 8), { href: `/jobs/${encodeURIComponent(j.id)}` }));
    tr.append(link, ...cells.map((text) => el("td", text, text === j.prompt ? { class: "prompt" } : {})),
      progressCell(j.progress_done, j.progress_total));
    return tr;
  }

  function renderDaemons(data) {
    const box = document.getElementById("daemons");
    const sections = data.daemons.map((d) => {
      const section = el("section", null, { class: "daemon", "data-daemon": d.id });
      const title = el("h3", `${d.host} · pid ${d.pid} `);
      if (d.stale) title.append(el("span", "stale", { class: "bad" }));
      section.append(title, el("p", `${d.id} · ${d.generator} · models ${d.models.join(", ")} · v${d.version}` +
        ` · heartbeat ${d.heartbeat_age_seconds} s ago`, { class: "muted" }));
      const table = el("table");
      const head = el("tr");
      ["job", "model", "prompt", "progress"].forEach((h) => head.append(el("th", h)));
      table.append(el("thead"), el("tbody"));
      table.tHead.append(head);
      if (d.jobs.length === 0) {
        const tr = el("tr");
        tr.append(el("td", "idle", { colspan: "4", class: "muted" }));
        table.tBodies[0].append(tr);
      }
      for (const j of d.jobs) table.tBodies[0].append(jobRow(j, [j.model_name, j.prompt]));
      section.append(table);
      return section;
    });
    if (sections.length === 0) sections.push(el("p", "No live daemons.", { class: "muted" }));
    box.replaceChildren(...sections);
  }

  function renderJob(data) {
    const status = document.getElementById("status");
    // The status as JSON: the text the HTML parser made of it may differ (a carriage return
    // becomes a line feed), and a reload on every poll would never end.
    if (JSON.parse(status.dataset.status) !== data.status) {
      location.reload();  // the buttons and the player depend on the status
      return;
    }
    const bar = document.getElementById("progress");
    if (bar && Number.isInteger(data.progress_total) && data.progress_total > 0) {
      bar.max = data.progress_total;
      bar.value = data.progress_done || 0;
    }
  }

  const renderers = {
    overview: ["/api/overview", renderOverview],
    daemons: ["/api/daemons", renderDaemons],
  };
  if (page === "job") {
    const id = document.getElementById("status").dataset.jobId;
    renderers.job = [`/api/jobs/${encodeURIComponent(id)}`, renderJob];
  }
  const chosen = renderers[page];
  if (!chosen) return;
  const [url, render] = chosen;
  async function tick() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.ok) {
        render(await response.json());
        document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      } else {
        document.getElementById("updated").textContent = `not updated: HTTP ${response.status}`;
      }
    } catch (e) {
      document.getElementById("updated").textContent = "not reachable";
    }
    setTimeout(tick, pollMs);
  }
  setTimeout(tick, pollMs);
})();
