/* The fxscale report page: draw the edges between blocks, expand folded kinds, show details. */
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const graph = document.getElementById("graph");
  const svg = document.getElementById("edges");
  const panel = document.getElementById("panel-body");
  // [source block, target block, group edges folded in, runs against the ranking (back),
  //  rows it spans, tooltip]
  const edges = JSON.parse(document.getElementById("edge-data").textContent);

  function boxes() {
    // every block's box relative to the graph area (and its row), measured once per drawing
    const origin = graph.getBoundingClientRect();
    const out = {};
    graph.querySelectorAll("[data-block]").forEach(function (el) {
      const r = el.getBoundingClientRect();
      const left = r.left - origin.left + graph.scrollLeft, top = r.top - origin.top;
      out[el.dataset.block] = {left: left, top: top, right: left + r.width,
                               bottom: top + r.height, cx: left + r.width / 2,
                               cy: top + r.height / 2, rank: +el.parentNode.dataset.rank};
    });
    return out;
  }

  function route(at, e, nth) {
    // the SVG path of edge e over the block boxes `at`; nth: how many detours came before
    const a = at[e[0]], b = at[e[1]];
    if (e[3]) {  // into the next layer: loop around the right-hand side
      const x = Math.max(a.right, b.right) + 36;
      return `M${a.right},${a.cy} C${x},${a.cy} ${x},${b.cy} ${b.right},${b.cy}`;
    }
    if (e[4] > 1) {  // skips rows: detour left of every block in between
      let x = Math.min(a.left, b.left);
      Object.values(at).forEach(function (c) {
        if (c.rank > a.rank && c.rank < b.rank) x = Math.min(x, c.left);
      });
      x -= 18 + 10 * nth;
      return `M${a.left},${a.cy} C${x},${a.cy} ${x},${a.cy} ${x},${(a.cy + b.cy) / 2} ` +
             `S${x},${b.cy} ${b.left},${b.cy}`;
    }
    const bend = Math.max(18, (b.top - a.bottom) / 2);
    return `M${a.cx},${a.bottom} C${a.cx},${a.bottom + bend} ` +
           `${b.cx},${b.top - bend} ${b.cx},${b.top}`;
  }

  function draw() {
    svg.setAttribute("width", graph.scrollWidth);
    svg.setAttribute("height", graph.scrollHeight);
    svg.querySelectorAll("path.edge").forEach(function (p) { p.remove(); });
    const at = boxes();
    let detours = 0;
    edges.forEach(function (e) {
      const path = document.createElementNS(NS, "path");
      path.setAttribute("d", route(at, e, e[4] > 1 ? detours++ : 0));
      path.setAttribute("class", e[3] ? "edge back" : "edge");
      path.setAttribute("stroke-width", (1.2 + 0.5 * Math.log2(e[2])).toFixed(2));
      path.setAttribute("marker-end", "url(#arrow)");
      const title = document.createElementNS(NS, "title");
      title.textContent = e[5];
      path.appendChild(title);
      svg.appendChild(path);
    });
  }

  function show(el) {
    document.querySelectorAll(".selected").forEach(function (s) {
      s.classList.remove("selected");
    });
    el.classList.add("selected");
    panel.replaceChildren(el.querySelector(":scope > template").content.cloneNode(true));
  }

  function setOpen(kind, open) {
    const button = kind.querySelector(":scope > .toggle");
    kind.classList.toggle("open", open);
    button.setAttribute("aria-expanded", String(open));
    button.textContent = open ? "collapse" : `expand ${kind.dataset.count} layers`;
  }

  function setAll(open) {
    document.querySelectorAll(".kind").forEach(function (k) { setOpen(k, open); });
    draw();
  }

  graph.addEventListener("click", function (ev) {
    const toggle = ev.target.closest(".toggle");
    if (toggle) {
      const kind = toggle.closest(".kind");
      setOpen(kind, !kind.classList.contains("open"));
      draw();
      return;
    }
    const el = ev.target.closest(".member, .block");
    if (el) show(el);
  });
  graph.addEventListener("keydown", function (ev) {
    const el = ev.target.closest(".member, .block");
    if (el && (ev.key === "Enter" || ev.key === " ")) {
      ev.preventDefault();
      show(el);
    }
  });
  document.getElementById("expand-all").addEventListener("click", function () { setAll(true); });
  document.getElementById("collapse-all").addEventListener("click", function () { setAll(false); });
  window.addEventListener("resize", draw);
  window.addEventListener("load", function () {
    draw();
    // time from navigation start until the graph is laid out with its edges (docs/report.md)
    document.body.dataset.readyMs = performance.now().toFixed(1);
  });
})();
