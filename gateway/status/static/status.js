"use strict";
// The status page: polls /status.json and redraws. Every value from the gateway goes into
// the page as text (textContent, SVG attributes), never as markup: client and model names
// come from clients.
(function () {
  const POLL_MS = __POLL_MS__;
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#2f6fde", "#e0873a", "#1a7f37", "#9b59b6", "#c0392b", "#16a2b8",
    "#7f8c8d", "#d4a017", "#8e5b3e", "#e84393"];
  const $ = (id) => document.getElementById(id);

  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children || []) if (child) node.appendChild(child);
    return node;
  }
  function svg(tag, attrs, children) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value; else node.setAttribute(key, value);
    }
    for (const child of children || []) if (child) node.appendChild(child);
    return node;
  }
  const int = (n) => Math.round(n).toLocaleString("en-US");
  function secs(s) {
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(s / 60), r = Math.round(s % 60);
    if (m < 60) return m + " min " + String(r).padStart(2, "0") + " s";
    return Math.floor(m / 60) + " h " + String(m % 60).padStart(2, "0") + " min";
  }
  const when = (iso) => iso ? iso.replace("T", " ").replace("Z", " UTC") : "?";
  function cell(text, cls) { return el("td", { text: String(text), class: cls || "" }); }
  function row(cells, cls) { return el("tr", { class: cls || "" }, cells); }
  function head(names) {
    return el("thead", {}, [el("tr", {}, names.map(
      ([n, num]) => el("th", { text: n, class: num ? "num" : "" })))]);
  }

  const palette = {};
  function color(name) {
    if (!(name in palette)) palette[name] = COLORS[Object.keys(palette).length % COLORS.length];
    return palette[name];
  }

  function hostCard(host, history) {
    const up = host.status === "up";
    const title = el("h3", {}, [
      document.createTextNode(host.name + " "),
      el("span", { class: "muted", text: host.url + " " }),
      el("span", { class: "badge host-status " + (up ? "ok" : "bad"), text: host.status }),
    ]);
    const since = el("div", { class: "muted", text: (up ? "up" : "degraded") + " since " +
      when(host.since) + (host.last_good_poll ? "; last good poll " + when(host.last_good_poll) : "") });
    const why = host.why ? el("div", { class: "error host-why", text: host.why }) : null;
    const models = el("div", { class: "models" });
    const resident = new Set(host.resident);
    for (const name of host.resident) models.appendChild(el("span", { class: "model resident", text: name + " (loaded)" }));
    for (const name of host.installed) if (!resident.has(name)) models.appendChild(el("span", { class: "model", text: name }));
    if (!host.installed.length && !host.resident.length) models.appendChild(el("span", { class: "empty", text: "no models known" }));

    const gens = el("table", { class: "generations" }, [head([["client"], ["model"], ["priority"],
      ["elapsed", 1], ["tokens so far", 1], ["tokens/s", 1]])]);
    const gbody = el("tbody");
    for (const g of host.generations) {
      gbody.appendChild(row([cell(g.client), cell(g.model + (g.loads ? " (loading)" : "")), cell(g.priority),
        cell(secs(g.elapsed_s), "num"), cell(int(g.tokens), "num"),
        cell(g.tokens_per_s == null ? "–" : g.tokens_per_s.toFixed(1), "num")], "generation"));
    }
    if (!host.generations.length) gbody.appendChild(row([el("td", { colspan: "6", class: "empty", text: "idle: nothing is generating" })]));
    gens.appendChild(gbody);

    const queue = el("table", { class: "queue" }, [head([["#", 1], ["client"], ["model"], ["priority"],
      ["waited", 1], ["starts in (est.)", 1]])]);
    const qbody = el("tbody");
    host.queue.forEach((w, i) => qbody.appendChild(row([cell(i + 1, "num"), cell(w.client), cell(w.model),
      cell(w.priority), cell(secs(w.waited_s), "num"), cell("~" + secs(w.starts_in_s), "num")], "waiting")));
    if (host.queued > host.queue.length) qbody.appendChild(row([el("td", { colspan: "6", class: "empty",
      text: "and " + (host.queued - host.queue.length) + " more" })]));
    if (!host.queued) qbody.appendChild(row([el("td", { colspan: "6", class: "empty", text: "nobody waits" })]));
    queue.appendChild(qbody);

    return el("div", { class: "card host", "data-host": host.name }, [
      title, since, why, models,
      el("h3", { text: "Generating now (" + host.generations.length + " of " + host.capacity + ")" }),
      el("div", { class: "scroll" }, [gens]),
      el("h3", { text: "Queue (" + host.queued + ", at most " + host.max_queue + ")" }),
      el("div", { class: "scroll" }, [queue]),
      el("h3", { text: "Last hour: queue length and GPU busy" }),
      historyChart(history),
    ]);
  }

  function historyChart(history) {
    const W = 600, H = 110, L = 28, B = 16, span = history ? history.span_s : 3600;
    const points = history ? history.points : [];
    const maxQ = Math.max(1, ...points.map((p) => p[1]));
    const x = (ago) => L + (W - L) * (1 - ago / span);
    const yb = (f) => (H - B) - f * (H - B - 4);
    const yq = (q) => (H - B) - (q / maxQ) * (H - B - 4);
    const kids = [svg("line", { x1: L, y1: H - B, x2: W, y2: H - B, stroke: "#dde1e6" })];
    const step = (W - L) * 10 / span;
    for (const [ago, , busy] of points) {
      if (busy > 0) kids.push(svg("rect", { x: x(ago) - step / 2, y: yb(busy), width: Math.max(1, step),
        height: (H - B) - yb(busy), fill: "#e0873a", "fill-opacity": "0.55", class: "busy" }));
    }
    if (points.length) {
      const d = points.map((p, i) => (i ? "L" : "M") + x(p[0]).toFixed(1) + " " + yq(p[1]).toFixed(1)).join(" ");
      kids.push(svg("path", { d, fill: "none", stroke: "#2f6fde", "stroke-width": "2", class: "queue-line" }));
    }
    kids.push(svg("text", { x: 0, y: 10, text: String(maxQ) }));
    kids.push(svg("text", { x: 0, y: H - B, text: "0" }));
    kids.push(svg("text", { x: L, y: H - 2, text: "-60 min" }));
    kids.push(svg("text", { x: W - 24, y: H - 2, text: "now" }));
    const chart = el("div", { class: "chart history" });
    chart.appendChild(svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "queue length and GPU busy over the last hour" }, kids));
    chart.appendChild(el("div", { class: "legend" }, [
      el("span", {}, [el("span", { class: "swatch", "data-c": "q" }), document.createTextNode("queue length (max " + maxQ + ")")]),
      el("span", {}, [el("span", { class: "swatch", "data-c": "b" }), document.createTextNode("GPU busy")]),
    ]));
    chart.querySelectorAll(".swatch").forEach((s) => { s.style.background = s.dataset.c === "q" ? "#2f6fde" : "#e0873a"; });
    return chart;
  }

  function providers(list) {
    const body = el("tbody");
    for (const p of list) {
      const state = p.registered
        ? el("td", {}, [el("span", { class: "badge ok", text: "registered" })])
        : el("td", { class: "wrap" }, [el("span", { class: "badge", text: "not registered" }),
            el("div", { class: "muted", text: p.missing || "" })]);
      const last = p.last_error
        ? el("td", { class: "wrap error", text: p.last_error + " (" + secs(p.last_error_ago_s) + " ago)" })
        : cell("–");
      body.appendChild(row([cell(p.name), state, cell(int(p.requests_1h), "num"),
        cell(int(p.errors_1h), "num"), last], "provider"));
    }
    $("providers").replaceChild(body, $("providers").tBodies[0]);
  }

  function usageTable(id, rows, what) {
    const table = $(id);
    table.replaceChildren(head([[what], ["requests", 1], ["tokens in", 1], ["tokens out", 1],
      ["GPU s", 1], ["cloud tokens"]]));
    const body = el("tbody");
    for (const r of rows) {
      const cloud = Object.entries(r.cloud_tokens).map(([p, n]) => p + " " + int(n)).join(", ") || "–";
      body.appendChild(row([cell(r.name || "(none)"), cell(int(r.requests), "num"), cell(int(r.input_tokens), "num"),
        cell(int(r.output_tokens), "num"), cell(r.gpu_s.toFixed(1), "num"), cell(cloud)], "usage-row"));
    }
    if (!rows.length) body.appendChild(row([el("td", { colspan: "6", class: "empty", text: "no requests" })]));
    table.appendChild(body);
  }

  function tokensChart(usage) {
    const W = 600, H = 150, L = 40, B = 18, days = usage.days, series = usage.tokens_per_day;
    const names = Object.keys(series).sort();
    const totals = days.map((_, i) => names.reduce((s, n) => s + series[n][i], 0));
    const max = Math.max(1, ...totals);
    const slot = (W - L) / days.length, bw = slot * 0.6;
    const kids = [svg("line", { x1: L, y1: H - B, x2: W, y2: H - B, stroke: "#dde1e6" })];
    days.forEach((day, i) => {
      let y = H - B;
      for (const n of names) {
        const v = series[n][i];
        if (!v) continue;
        const h = v / max * (H - B - 6);
        y -= h;
        kids.push(svg("rect", { x: L + i * slot + (slot - bw) / 2, y, width: bw, height: h, fill: color(n) },
          [svg("title", { text: n + ": " + int(v) + " tokens on " + day })]));
      }
      kids.push(svg("text", { x: L + i * slot + slot / 2 - 14, y: H - 4, text: day.slice(5) }));
    });
    kids.push(svg("text", { x: 0, y: 10, text: int(max) }));
    const box = $("tokens-chart");
    box.replaceChildren(svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "tokens per client per day" }, kids));
    const legend = el("div", { class: "legend" });
    for (const n of names) {
      const sw = el("span", { class: "swatch" });
      sw.style.background = color(n);
      legend.appendChild(el("span", {}, [sw, document.createTextNode(n)]));
    }
    if (!names.length) legend.appendChild(el("span", { class: "empty", text: "no tokens this week" }));
    box.appendChild(legend);
  }

  function render(s) {
    $("updated").textContent = "updated " + when(s.generated_at);
    $("draining").hidden = !s.draining;
    $("viewer").textContent = s.viewer ? "signed in as " + s.viewer : "";
    $("logout").hidden = !s.viewer;
    const hosts = $("hosts");
    hosts.replaceChildren(...s.hosts.map((h) => hostCard(h, s.history.find((x) => x.name === h.name))));
    providers(s.providers);
    const u = s.usage, note = $("usage-note");
    note.hidden = !u.error;
    note.textContent = u.error || "";
    usageTable("usage-clients-today", u.clients_today, "client");
    usageTable("usage-clients-week", u.clients_week, "client");
    usageTable("usage-models-today", u.models_today, "model");
    usageTable("usage-models-week", u.models_week, "model");
    tokensChart(u);
  }

  async function poll() {
    try {
      const response = await fetch("/status.json", { cache: "no-store", credentials: "same-origin" });
      if (response.status === 401) { window.location.reload(); return; }
      if (response.ok) render(await response.json());
      else $("updated").textContent = "the gateway answered " + response.status;
    } catch (e) {
      $("updated").textContent = "cannot reach the gateway; retrying";
    }
    setTimeout(poll, POLL_MS);
  }
  poll();
})();
