// The live parts of the hub's web view: a running run's event log and status, and the status
// of the running runs in the runs table, over Server-Sent Events. Text from the server is only
// ever set as textContent; HTML only comes from the server's own (escaping) templates.
"use strict";

(function () {
  function eventItem(e) {
    const li = document.createElement("li");
    li.className = "event ev-" + e.kind.replace(/\./g, "-") + (e.stream ? " stream-" + e.stream : "");
    const time = document.createElement("time");
    time.textContent = e.time;
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = e.kind;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = e.text;
    li.append(time, " ", kind, " ", text);
    return li;
  }

  function refreshPanel(id, panel) {
    fetch("/runs/" + encodeURIComponent(id) + "/panel", { credentials: "same-origin" })
      .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
      .then((html) => {
        panel.innerHTML = html;
      })
      .catch(() => window.location.reload());
  }

  const run = document.getElementById("run");
  if (run && run.dataset.status === "running") {
    const id = run.dataset.run;
    const list = document.getElementById("events");
    const panel = document.getElementById("panel");
    const url = "/runs/" + encodeURIComponent(id) + "/stream?offset=" + run.dataset.offset;
    const source = new EventSource(url);
    source.addEventListener("log", (m) => {
      list.appendChild(eventItem(JSON.parse(m.data)));
    });
    source.addEventListener("finished", () => {
      source.close();
      run.dataset.status = "finished";
      refreshPanel(id, panel);
    });
  }

  const table = document.getElementById("runs-table");
  if (table) {
    const rows = new Map();
    table.querySelectorAll("tr[data-status='running']").forEach((row) => {
      rows.set(row.dataset.run, row);
    });
    if (rows.size) {
      const ids = Array.from(rows.keys()).join(",");
      const source = new EventSource("/runs/status?ids=" + encodeURIComponent(ids));
      source.addEventListener("status", (m) => {
        const s = JSON.parse(m.data);
        const row = rows.get(s.id);
        if (!row) return;
        row.dataset.status = s.status;
        const badge = row.querySelector(".status");
        badge.className = "status status-" + s.status;
        badge.textContent = s.status;
        row.querySelector(".duration").textContent = s.duration;
        row.querySelector(".exit").textContent = s.exit === null ? "" : String(s.exit);
        if (s.status !== "running") rows.delete(s.id);
        if (!rows.size) source.close();
      });
    }
  }

  const logs = new Map();
  document.querySelectorAll("pre.envlog[data-env]").forEach((pre) => logs.set(pre.dataset.env, pre));
  if (logs.size) {
    const source = new EventSource("/environments/logs");
    source.addEventListener("log", (m) => {
      const update = JSON.parse(m.data);
      const pre = logs.get(update.env);
      if (pre) pre.textContent = update.lines.join("\n");
    });
  }
})();
