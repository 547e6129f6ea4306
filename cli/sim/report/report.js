// report.js — draws fedpeft's report from the JSON embedded in the page (no network, no
// libraries). Every chart is an SVG figure; when all are drawn, <body> gets
// data-charts="N" (figures drawn) and each figure data-drawn="points" — what the headless
// browser test reads back. An error is shown on the page and set as <body data-error>.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                   "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];
  const doc = JSON.parse(document.getElementById("fedpeft-data").textContent);
  const main = document.getElementById("main");
  let drawn = 0;

  function el(tag, attrs, text) {
    const e = tag === "svg" || tag in SVG_TAGS ? document.createElementNS(NS, tag)
                                               : document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  const SVG_TAGS = {g: 1, path: 1, line: 1, text: 1, circle: 1, rect: 1, title: 1};

  function section(title, note) {
    const s = el("section");
    s.appendChild(el("h2", {}, title));
    if (note) s.appendChild(el("p", {class: "note"}, note));
    main.appendChild(s);
    return s;
  }

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a < 0.01 || a >= 1e5)) return v.toExponential(2);
    return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(3);
  }

  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; lo = lo - 1; }
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
    // labels with as many decimals as the step needs
    const dec = Math.max(0, -Math.floor(Math.log10(step) + 1e-9) + (step / mag === 2.5 ? 1 : 0));
    out.label = v => (Math.abs(v) < step * 1e-6 ? 0 : v).toFixed(Math.min(dec, 6));
    return out;
  }

  // series: [{name, points: [[x, y], ...], dashed?}]; opts: {x, y, integerX, bars}
  function chart(parent, title, series, opts) {
    opts = opts || {};
    const fig = el("figure", {class: "chart"});
    fig.appendChild(el("figcaption", {}, title));
    const W = 640, H = 310, L = 64, R = 150, T = 14, B = 54;
    const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img"});
    svg.appendChild(el("title", {}, title));
    const pts = series.flatMap(s => s.points.filter(p => p[1] !== null && isFinite(p[1])));
    if (!pts.length) {
      fig.appendChild(el("p", {class: "note"}, "no data yet"));
      parent.appendChild(fig);
      fig.setAttribute("data-drawn", "0");
      drawn++;
      return;
    }
    let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
    let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
    if (opts.zero || opts.bars) { y0 = Math.min(0, y0); y1 = Math.max(0, y1); }
    if (opts.bars) { x0 -= 0.6; x1 += 0.6; }
    else if (x1 === x0) { x0 -= 1; x1 += 1; }
    const pad = (y1 - y0) * 0.06 || Math.abs(y1) * 0.05 || 1;
    if (!(opts.zero || opts.bars)) y0 -= pad;
    y1 += pad;
    const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
    const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
    const axes = el("g", {class: "axes"});
    const yt = niceTicks(y0, y1, 5);
    for (const v of yt) {
      axes.appendChild(el("line", {x1: L, x2: W - R, y1: sy(v), y2: sy(v), class: "grid"}));
      axes.appendChild(el("text", {x: L - 6, y: sy(v) + 4, "text-anchor": "end"}, yt.label(v)));
    }
    const nt = niceTicks(x0, x1, 8);
    const xt = opts.labels ? opts.labels.map((_, i) => i)
                           : nt.filter(v => !opts.integerX || Math.abs(v % 1) < 1e-9);
    for (const v of xt) {
      axes.appendChild(el("line", {x1: sx(v), x2: sx(v), y1: H - B, y2: H - B + 4}));
      const tilt = opts.labels && opts.labels.length > 5; // long labels lean, not overlap
      axes.appendChild(el("text", tilt ? {x: sx(v), y: H - B + 14, "text-anchor": "end",
                                          transform: `rotate(-20 ${sx(v)} ${H - B + 14})`}
                                       : {x: sx(v), y: H - B + 17, "text-anchor": "middle"},
                          opts.labels ? opts.labels[v] : nt.label(v)));
    }
    axes.appendChild(el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B}));
    axes.appendChild(el("line", {x1: L, x2: L, y1: T, y2: H - B}));
    axes.appendChild(el("text", {x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle",
                                 class: "label"}, opts.x || ""));
    axes.appendChild(el("text", {x: 14, y: (T + H - B) / 2, "text-anchor": "middle",
                                 class: "label", transform: `rotate(-90 14 ${(T + H - B) / 2})`},
                        opts.y || ""));
    svg.appendChild(axes);
    let count = 0;
    const bw = opts.bars ? (W - L - R) / (x1 - x0) * 0.8 / series.length : 0;
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      const g = el("g", {class: "series"});
      const ok = s.points.filter(p => p[1] !== null && isFinite(p[1]));
      if (opts.bars) {
        for (const p of ok) {
          const x = sx(p[0]) - 0.4 * (W - L - R) / (x1 - x0) + i * bw;
          const base = 0; // bars start at zero
          const r = el("rect", {x: x, y: Math.min(sy(p[1]), sy(base)), width: Math.max(bw - 1, 1),
                                height: Math.abs(sy(base) - sy(p[1])), fill: color});
          r.appendChild(el("title", {}, `${s.name}: ${fmt(p[1])}`));
          g.appendChild(r);
          count++;
        }
      } else {
        const d = ok.map((p, k) => `${k ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`)
                    .join("");
        g.appendChild(el("path", {d: d, fill: "none", stroke: color,
                                  "stroke-width": s.bold ? 3 : 1.8,
                                  "stroke-dasharray": s.dashed ? "5 4" : "none"}));
        for (const p of ok) {
          const c = el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: s.bold ? 3.5 : 2.5, fill: color});
          c.appendChild(el("title", {}, `${s.name} @ ${p[0]}: ${fmt(p[1])}`));
          g.appendChild(c);
          count++;
        }
      }
      svg.appendChild(g);
      const ly = T + 6 + i * 17;
      svg.appendChild(el("rect", {x: W - R + 12, y: ly - 5, width: 14, height: 4, fill: color}));
      svg.appendChild(el("text", {x: W - R + 32, y: ly, class: "legend"}, s.name));
    });
    fig.appendChild(svg);
    parent.appendChild(fig);
    fig.setAttribute("data-drawn", String(count));
    drawn++;
  }

  function table(parent, head, rows, cls) {
    const t = el("table", {class: cls || ""});
    const tr = el("tr");
    head.forEach(h => tr.appendChild(el("th", {}, h)));
    t.appendChild(el("thead")).appendChild(tr);
    const tb = el("tbody");
    rows.forEach(r => {
      const row = el("tr");
      r.forEach(c => {
        const td = el("td", typeof c === "object" && c !== null ? c.attrs : {},
                      typeof c === "object" && c !== null ? c.text : String(c));
        row.appendChild(td);
      });
      tb.appendChild(row);
    });
    t.appendChild(tb);
    parent.appendChild(t);
  }

  const runs = doc.runs || [];
  const runName = run => run.label || run.strategy; // "ffa ε=8": a strategy at a DP budget
  const byRound = (run, r) => run.rounds.find(x => x.n === r);

  // ---- summary
  {
    const s = section("Federation", doc.summary || "");
    const rows = runs.map(run => {
      const closed = run.rounds.filter(r => r.state === "closed");
      const up = run.rounds.reduce((a, r) => a + (r.bytes_in || 0), 0);
      const down = run.rounds.reduce((a, r) => a + (r.bytes_out || 0), 0);
      const f = run.federation || {};
      return [runName(run), f.target_modules || f.targets || "", f.r_max, closed.length,
              run.sites.length, fmt(up / 1e6), fmt(down / 1e6)];
    });
    table(s, ["strategy", "targets", "r_max", "closed rounds", "sites", "MB up", "MB down"],
          rows);
  }

  // ---- the scoreboard: the share of the centralised gain first, then the scores
  if (doc.table) {
    const t = doc.table;
    const acc = t.metric === "accuracy";
    const pct = v => (v === null || v === undefined || !isFinite(v)) ? "–"
                                                                      : (100 * v).toFixed(0) + " %";
    const row = name => t.rows.find(r => r.model === name);
    const shareKey = acc ? "share" : "share_loss", pooledShare = "pooled_" + shareKey;
    const central = row("centralised");
    if (central) {
      const fed = t.rows.filter(r => r.model.startsWith("global: "));
      const local = row("local-only"), base = t.rows[0];
      const score = r => acc ? (100 * r.pooled_accuracy).toFixed(1) + " %" : r.pooled.toFixed(4);
      const lead = fed.map(r => `${r.model.replace("global: ", "federated (")}): ` +
                              `${pct(r[pooledShare])}`).join(", ");
      const s = section("What federating recovers",
                        `Share of the centralised gain, (X − base) / (centralised − base), in ` +
                        `${acc ? "accuracy" : "held-out loss"} on every site's held-out ` +
                        `documents: 100 % is as good as pooling all the sites' data in one place, ` +
                        `0 % no better than the base model. Per site, a site alone is judged on ` +
                        `its own documents — the only categories it knows, where it may beat ` +
                        `everyone; pooled, on all of them.`);
      s.appendChild(el("p", {class: "headline"},
                       `${lead}; each site alone: ${pct(local && local[pooledShare])}. ` +
                       `Pooled ${acc ? "accuracy" : "loss"}: base ${score(base)}, ` +
                       `each site alone ${local ? score(local) : "–"}, ` +
                       fed.map(r => `${r.model.replace("global: ", "")} ${score(r)}`).join(", ") +
                       `, centralised ${score(central)}.`));
      const rows = t.rows.filter(r => r[shareKey]);
      table(s, ["model"].concat(t.sites, ["pooled"]), rows.map(r =>
        [{text: r.model, attrs: {title: r.note}}].concat(
          r[shareKey].concat([r[pooledShare]]).map(v => ({text: pct(v), attrs: {class: "num"}})))),
        "scores");
      chart(s, "Share of the centralised gain (pooled)", [{name: "share of the gain, %",
            points: rows.map((r, i) => [i, 100 * r[pooledShare]])}],
            {bars: true, zero: true, labels: rows.map(r => r.model.replace("global: ", "")),
             y: "% of the centralised gain"});
    }
    const best = (key, pkey, better) => {
      const out = [];
      for (let c = 0; c <= t.sites.length; c++) {
        const vals = t.rows.map(r => c < t.sites.length ? r[key][c] : r[pkey])
                           .filter(v => v !== null && isFinite(v));
        out.push(better(...vals));
      }
      return out;
    };
    const scoreTable = (s, key, pkey, fmtv, better) => {
      const b = best(key, pkey, better);
      table(s, ["model"].concat(t.sites, ["pooled"]), t.rows.map(r =>
        [{text: r.model, attrs: {title: r.note}}].concat(
          r[key].concat([r[pkey]]).map((v, c) =>
            ({text: fmtv(v), attrs: {class: v === b[c] ? "best num" : "num"}})))), "scores");
    };
    const labels = t.rows.map(r => r.model.replace("global: ", ""));
    if (acc) {
      const s = section("Accuracy (higher is better)",
                        `The label the model writes after each held-out prompt, among ` +
                        `${t.labels.length} (${t.labels.join(", ")}); chance ` +
                        `${(100 * t.chance).toFixed(1)} %. Pooled: all held-out examples. ` +
                        `Local-only: each site's own adapter on its own data; pooled, the mean ` +
                        `over sites of one site's adapter on all the data.`);
      scoreTable(s, "accuracy", "pooled_accuracy", v => (100 * v).toFixed(1) + " %", Math.max);
      chart(s, "Pooled accuracy by model", [{name: "accuracy, %",
            points: t.rows.map((r, i) => [i, 100 * r.pooled_accuracy])}],
            {bars: true, zero: true, labels: labels, y: "accuracy, %"});
    }
    const s = section(acc ? "Loss of the true label (nats per token; lower is better)"
                          : "Held-out loss (nats per token; lower is better)",
                      "Each site's held-out documents, which no training saw; pooled: all of them " +
                      "(token-weighted). Local-only: each site trains alone for as many steps as " +
                      "it trained in the federation; centralised: one adapter on all the sites' " +
                      "data, as many steps as all sites together.");
    scoreTable(s, "loss", "pooled", v => v.toFixed(4), Math.min);
    chart(s, "Pooled held-out loss by model", [{name: "pooled loss",
          points: t.rows.map((r, i) => [i, r.pooled])}],
          {bars: true, zero: true, labels: labels, y: "loss"});
  }

  // ---- curves
  const final = name => {
    if (!doc.table) return null;
    const r = doc.table.rows.find(x => x.model === "global: " + name);
    return r || null;
  };
  if (runs.length) {
    const s = section("Global model by round",
                      "Held-out loss of the global adapter as the sites received it at the start " +
                      "of each round, on the held-out data of the sites in that round (pooled " +
                      "by tokens in a simulation, else weighted by samples); the last point is " +
                      "the final global adapter on all the pooled held-out data.");
    const tokens = doc.table ? Object.fromEntries(doc.table.sites.map((n, i) =>
                                   [n, doc.table.tokens[i]])) : null;
    const pooledAt = (run, r) => {
      if (!tokens) return r.eval_loss_before;
      let num = 0, den = 0;
      for (const t of run.tasks)
        if (t.round === r.n && t.eval_loss_before !== null && tokens[t.site]) {
          num += t.eval_loss_before * tokens[t.site];
          den += tokens[t.site];
        }
      return den ? num / den : r.eval_loss_before;
    };
    const series = runs.map(run => {
      const pts = run.rounds.filter(r => r.eval_loss_before !== null && r.n >= 1)
                            .map(r => [r.n - 1, pooledAt(run, r)]);
      const f = final(runName(run));
      if (f) pts.push([run.rounds.length ? Math.max(...run.rounds.map(r => r.n)) : 0, f.pooled]);
      return {name: runName(run), points: pts};
    });
    if (doc.table) {
      const base = doc.table.rows[0];
      const last = Math.max(1, ...runs.map(r => r.rounds.length));
      series.push({name: "base model", dashed: true, color: "#444",
                   points: [[0, base.pooled], [last, base.pooled]]});
    }
    chart(s, "Held-out loss of the global adapter", series,
          {x: "rounds aggregated", y: "loss", integerX: true});
  }
  const curved = doc.table ? doc.table.rows.filter(r => r.curve && r.curve.length) : [];
  if (curved.length) {
    const metric = doc.table.metric === "accuracy" ? "accuracy" : "held-out loss";
    const s = section("Share of the centralised gain by round",
                      "Each run's global adapter after every round, scored as the final one " +
                      `(${metric}, pooled over every site's held-out documents): ` +
                      "(X − base) / (centralised − base). 100 % is as good as pooling all the " +
                      "data; the table says when each run first reached 50 % and 80 %.");
    chart(s, "Share of the centralised gain", curved.map(r => ({
            name: r.model.replace("global: ", ""),
            points: r.curve.filter(p => p.share !== null).map(p => [p.round, 100 * p.share])})),
          {x: "rounds", y: "% of the centralised gain", integerX: true, zero: true});
    const first = (r, t) => { const p = r.curve.find(q => q.share !== null && q.share >= t);
                              return p ? String(p.round) : "not reached"; };
    table(s, ["run", "rounds to 50 %", "rounds to 80 %", "after the last round"],
          curved.map(r => [r.model.replace("global: ", ""), first(r, 0.5), first(r, 0.8),
                           (r.curve[r.curve.length - 1].share === null ? "—"
                            : fmt(100 * r.curve[r.curve.length - 1].share) + " %")]));
  }
  for (const run of runs) {
    const s = section(`Per site: ${runName(run)}`,
                      "Held-out loss of each site: the global adapter it received each round " +
                      "(solid) and its own update after local training (dashed).");
    const names = run.sites.map(x => x.name);
    const f = final(runName(run));
    const series = [];
    names.forEach((n, i) => {
      const tasks = run.tasks.filter(t => t.site === n);
      const pts = tasks.filter(t => t.eval_loss_before !== null).map(t => [t.round - 1, t.eval_loss_before]);
      if (f && doc.table.sites.indexOf(n) >= 0)
        pts.push([Math.max(...run.rounds.map(r => r.n)), f.loss[doc.table.sites.indexOf(n)]]);
      series.push({name: n, color: PALETTE[i % PALETTE.length], points: pts});
    });
    chart(s, `Held-out loss per site — ${runName(run)}`, series,
          {x: "rounds aggregated", y: "loss", integerX: true});
    const after = names.map((n, i) => ({name: n + " local", dashed: true,
      color: PALETTE[i % PALETTE.length],
      points: run.tasks.filter(t => t.site === n && t.eval_loss_after !== null)
                       .map(t => [t.round, t.eval_loss_after])}));
    chart(s, `After local training, per site — ${runName(run)}`, after,
          {x: "round", y: "loss", integerX: true});
  }
  // ---- secure aggregation: which rounds were secure, and who dropped in which phase
  const secureRuns = runs.filter(run => run.secure && run.secure.length);
  if (secureRuns.length) {
    const s = section("Secure aggregation",
                      "Rounds aggregated with SecAgg+: the coordinator stored only masked " +
                      "updates and learned only their sum. Sites lost in each phase (keys, " +
                      "shares, masked input, unmasking); a failed round says why.");
    table(s, ["run", "round", "outcome"],
          secureRuns.flatMap(run => run.secure.map(e =>
            [runName(run), e.round, (e.kind === "secagg_failed" ? "failed: " : "") + e.detail])));
  }
  // ---- differential privacy: the mechanism and the budget each run spent, round by round
  const private_ = runs.filter(run => run.privacy);
  if (private_.length) {
    const s = section("Differential privacy",
      "Client-level DP-FedAvg: each round draws every site with the sampling rate, clips each " +
      "update to the bound C and adds Gaussian noise of standard deviation z·C to their sum. " +
      "ε is what the accountant (Rényi DP of the sampled Gaussian mechanism) charged after " +
      "each draw; no round opens past the budget.");
    table(s, ["run", "mode", "noise multiplier z", "sampling rate", "δ", "ε spent", "budget",
              "draws"],
          private_.map(run => [runName(run), run.privacy.mode,
                               fmt(run.privacy.noise_multiplier), fmt(run.privacy.sample_rate),
                               String(run.privacy.delta), fmt(run.privacy.epsilon),
                               fmt(run.privacy.epsilon_max), run.privacy.steps]));
    chart(s, "ε spent by round", private_.map((run, i) => ({
      name: runName(run), color: PALETTE[i % PALETTE.length],
      points: run.rounds.filter(r => r.epsilon !== null && r.epsilon !== undefined)
                        .map(r => [r.n, r.epsilon])})),
      {x: "round", y: "ε", integerX: true, zero: true});
  }
  if (runs.length) {
    const s = section("Ranks, traffic and time");
    const names = [...new Set(runs.flatMap(r => r.sites.map(x => x.name)))].sort();
    chart(s, "LoRA rank trained per site", runs.map(run => ({name: runName(run),
      points: names.map((n, i) => {
        const ts = run.tasks.filter(t => t.site === n);
        return [i, ts.length ? Math.max(...ts.map(t => t.rank)) : null];
      })})), {bars: true, zero: true, labels: names, y: "rank"});
    chart(s, "Bytes per round", runs.flatMap((run, i) => [
      {name: runName(run) + " up", color: PALETTE[i % PALETTE.length],
       points: run.rounds.map(r => [r.n, (r.bytes_in || 0) / 1e6])},
      {name: runName(run) + " down", dashed: true, color: PALETTE[i % PALETTE.length],
       points: run.rounds.map(r => [r.n, (r.bytes_out || 0) / 1e6])}]),
      {x: "round", y: "MB", integerX: true, zero: true});
    chart(s, "Round duration", runs.flatMap((run, i) => [
      {name: runName(run), color: PALETTE[i % PALETTE.length],
       points: run.rounds.filter(r => r.closed_ms && r.opened_ms)
                         .map(r => [r.n, (r.closed_ms - r.opened_ms) / 1e3])},
      {name: runName(run) + " merge", dashed: true, color: PALETTE[i % PALETTE.length],
       points: run.rounds.filter(r => r.agg_seconds !== null).map(r => [r.n, r.agg_seconds])}]),
      {x: "round", y: "seconds", integerX: true, zero: true});
  }
  if (doc.sites) {
    const s = section("Sites");
    table(s, ["site", "rank", "training documents", "held-out documents", "data"],
          doc.sites.map(x => [x.name, x.rank, x.train_docs, x.held_docs, x.categories]));
  } else if (runs.length) {
    const s = section("Sites");
    table(s, ["site", "rank budget", "samples", "connections"],
          runs[0].sites.map(x => [x.name, x.rank_budget, x.samples, x.connections]));
  }
  document.body.setAttribute("data-charts", String(drawn));
})();
