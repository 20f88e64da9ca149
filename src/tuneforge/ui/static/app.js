/* tuneforge ui: live curves (uPlot), overlays, the form's checks and "try it". No framework, no network
   beyond this server. */
"use strict";
const TF = (() => {
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
  const SKIP = new Set(["step", "split", "time", "epoch"]);
  const $ = (id) => document.getElementById(id);
  const enc = (id) => id.split("/").map(encodeURIComponent).join("/");

  // [{name, points: [[x, y], ...]}] -> uPlot data [xs, ys1, ...] over the union of the xs
  function align(series) {
    const xs = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const cols = series.map((s) => {
      const col = new Array(xs.length).fill(null);
      for (const [x, y] of s.points) col[index.get(x)] = y;
      return col;
    });
    return [xs, ...cols];
  }

  function draw(el, title, series) {
    if (!el) return;
    const live = series.filter((s) => s.points.length);
    const key = title + "|" + live.map((s) => s.name).join("|");
    if (!live.length) { el.innerHTML = `<p class="muted" style="padding:1em">${title}: no data yet</p>`; el._u = null; return; }
    const data = align(live);
    if (el._u && el._key === key) { el._u.setData(data); return; }
    if (el._u) el._u.destroy();
    el.innerHTML = "";
    const opts = {
      title, width: Math.max(360, el.clientWidth - 10), height: 250, scales: { x: { time: false } },
      series: [{ label: "step" }, ...live.map((s, i) => ({ label: s.name, stroke: COLORS[i % COLORS.length], width: 1.6,
        spanGaps: true, points: { show: s.points.length < 40 } }))],
      axes: [{ label: "step" }, { size: 64, values: (u, vals) => vals.map(fmt) }],
    };
    el._u = new uPlot(opts, data, el);
    el._key = key;
  }

  const fmt = (v) => v == null ? "" : (v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential(1) : String(+v.toPrecision(4)));
  const pts = (records, split, key) => records.filter((r) => r.split === split && typeof r[key] === "number")
    .map((r) => [r.step, r[key]]);
  const evalKeys = (records) => [...new Set(records.filter((r) => r.split === "eval")
    .flatMap((r) => Object.keys(r).filter((k) => !SKIP.has(k) && !k.includes("/") && typeof r[k] === "number")))];

  function drawRun(records) {
    draw($("chart-loss"), "loss", [{ name: "train loss", points: pts(records, "train", "loss") },
      { name: "eval loss", points: pts(records, "eval", "loss") }]);
    draw($("chart-eval"), "eval metrics", evalKeys(records).filter((k) => k !== "loss")
      .map((k) => ({ name: k, points: pts(records, "eval", k) })));
    draw($("chart-lr"), "learning rate", [{ name: "lr", points: pts(records, "train", "lr") }]);
  }

  async function runPage(runId, status) {
    let records = [], offset = 0, first = status;
    async function poll() {
      const r = await fetch(`/api/metrics/${enc(runId)}?offset=${offset}`);
      if (!r.ok) return false;
      const m = await r.json();
      records = m.reset ? m.records : records.concat(m.records);
      offset = m.offset;
      drawRun(records);
      const badge = $("status");
      badge.textContent = m.status; badge.className = "status " + m.status;
      if (m.wall) $("wall").textContent = m.wall;
      if (m.total && m.step != null) {
        $("progress-bar").style.width = Math.min(100, 100 * m.step / m.total) + "%";
        $("progress-text").textContent = `step ${m.step} / ${m.total}`;
      } else if (m.status === "finished") { $("progress-bar").style.width = "100%"; }
      if (m.log) { $("log").hidden = false; $("log").textContent = m.log; }
      if (first === "running" && m.status !== "running") { location.reload(); return false; }
      return m.status === "running";
    }
    const again = await poll();
    if (again) { const t = setInterval(async () => { if (!(await poll())) clearInterval(t); }, 1500); }
    setupTry(runId);
  }

  async function comparePage(ids) {
    const all = await Promise.all(ids.map(async (id) => (await (await fetch(`/api/metrics/${enc(id)}`)).json()).records));
    draw($("chart-loss"), "train loss", ids.map((id, i) => ({ name: id, points: pts(all[i], "train", "loss") })));
    draw($("chart-lr"), "learning rate", ids.map((id, i) => ({ name: id, points: pts(all[i], "train", "lr") })));
    const sel = $("eval-metric");
    const keys = [...new Set(all.flatMap(evalKeys))];
    sel.innerHTML = keys.map((k) => `<option>${k}</option>`).join("");
    const drawEval = () => draw($("chart-eval"), "eval " + sel.value,
      ids.map((id, i) => ({ name: id, points: pts(all[i], "eval", sel.value) })));
    sel.onchange = drawEval; drawEval();
    $("only-diff").onchange = (e) => $("config-diff").classList.toggle("only", e.target.checked);
  }

  // the runs list: statuses, steps and wall times follow the runs; a new run reloads the list
  function runsPage() {
    const shown = new Set([...document.querySelectorAll("#runs tbody tr")].map((r) => r.dataset.run));
    setInterval(async () => {
      const r = await fetch("/api/runs");
      if (!r.ok) return;
      const runs = await r.json();
      if (runs.some((x) => !shown.has(x.id))) { location.reload(); return; }
      for (const x of runs) {
        const row = document.querySelector(`#runs tr[data-run='${CSS.escape(x.id)}']`);
        if (!row) continue;
        const badge = row.querySelector(".status");
        badge.textContent = x.status; badge.className = "status " + x.status;
        row.querySelector(".step").textContent = x.step ?? "";
        row.querySelector(".wall").textContent = x.wall;
      }
    }, 3000);
  }

  function formPage() {
    for (const sel of document.querySelectorAll("select[name$='.name']")) {
      const block = sel.name.slice(0, -5);
      sel.addEventListener("change", () => {
        for (const v of document.querySelectorAll(`.variant[data-block='${block}']`)) v.hidden = v.dataset.variant !== sel.value;
      });
    }
    for (const g of document.querySelectorAll(".switch-group")) {
      const sw = g.querySelector("select");
      sw.addEventListener("change", () => { g.querySelector(".switch-fields").hidden = sw.value !== "on"; });
    }
    const form = $("run-form");
    $("check").addEventListener("click", async () => {
      const r = await fetch("/api/validate", { method: "POST", body: new URLSearchParams(new FormData(form)) });
      const m = await r.json();
      for (const f of form.querySelectorAll(".field")) { f.classList.remove("invalid"); f.querySelector(".error")?.remove(); }
      const box = $("form-errors");
      box.innerHTML = ""; box.hidden = true;
      if (m.ok) { $("command").hidden = false; $("command").textContent = m.command + "\n\n" + m.config; return; }
      $("command").hidden = true;
      for (const [input, msg] of Object.entries(m.errors)) {
        const f = form.querySelector(`.field[data-input='${CSS.escape(input)}']`);
        if (!f) continue;
        f.classList.add("invalid");
        const d = document.createElement("div"); d.className = "error"; d.setAttribute("role", "alert"); d.textContent = msg;
        f.appendChild(d);
        f.closest("details").open = true; f.closest("[hidden]")?.removeAttribute("hidden");
      }
      if (m.general.length) { box.hidden = false; for (const g of m.general) { const p = document.createElement("p"); p.textContent = g; box.appendChild(p); } }
      form.querySelector(".field.invalid input, .field.invalid select")?.focus();
    });
  }

  // ------------------------------------------------------------------ try it (the embedded tuneforge serve)
  async function serve(path, body) {
    const r = await fetch("/serve/v1/" + path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!r.ok) { const e = await r.json().catch(() => ({})); throw new Error(e.error?.message || r.statusText); }
    return r;
  }

  async function* sse(response) {
    const reader = response.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of chunk.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function setupTry(runId) {
    const btn = $("try-load");
    if (!btn) return;
    btn.addEventListener("click", async () => {
      btn.disabled = true; $("try-note").textContent = "loading ...";
      const r = await fetch(`/api/try/${enc(runId)}`, { method: "POST", headers: { "X-Tuneforge-UI": "1" } });
      const info = await r.json();
      if (!r.ok) { $("try-note").textContent = info.error || info.detail; btn.disabled = false; return; }
      $("try-note").textContent = `loaded as '${info.model}' (${info.route})`;
      if (info.route === "chat" || info.route === "complete") chat(info); else tasks(info);
    });
  }

  function chat(info) {
    $("try-chat").hidden = false;
    let messages = [];
    const log = $("chat-log");
    const add = (role, text) => { const d = document.createElement("div"); d.className = "msg " + role;
      d.innerHTML = `<b>${role}:</b> <span></span>`; d.querySelector("span").textContent = text; log.appendChild(d); return d.querySelector("span"); };
    $("chat-reset").onclick = () => { messages = []; log.innerHTML = ""; };
    $("chat-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const text = $("chat-input").value.trim();
      if (!text) return;
      $("chat-input").value = "";
      add("user", text);
      const out = add("assistant", "");
      out.parentElement.classList.add("streaming");
      try {
        const body = info.route === "chat"
          ? { model: info.model, messages: [...messages, { role: "user", content: text }], stream: true, max_tokens: 64 }
          : { model: info.model, prompt: text, stream: true, max_tokens: 64 };
        const r = await serve(info.route === "chat" ? "chat/completions" : "completions", body);
        for await (const chunk of sse(r)) {
          const c = chunk.choices?.[0];
          out.textContent += (c?.delta?.content ?? c?.text ?? "");
        }
        messages.push({ role: "user", content: text }, { role: "assistant", content: out.textContent });
      } catch (err) { out.textContent = "error: " + err.message; }
      out.parentElement.classList.remove("streaming");
      out.parentElement.classList.add("done");
    });
  }

  function tasks(info) {
    $("try-text").hidden = false;
    if (info.route === "answer") { $("try-input").placeholder = "question"; $("try-context").hidden = false; }
    $("try-go").onclick = async () => {
      const text = $("try-input").value;
      const body = info.route === "answer" ? { model: info.model, input: { question: text, context: $("try-context").value } }
        : { model: info.model, input: [text] };
      try {
        const r = await serve(info.route, body);
        const m = await r.json();
        $("try-out").textContent = JSON.stringify(m.data[0], null, 2);
      } catch (err) { $("try-out").textContent = "error: " + err.message; }
    };
  }

  return { runPage, runsPage, comparePage, formPage, align };
})();
