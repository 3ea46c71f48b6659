// lmforge web page: plain JS, no build step. Talks to the same server's /v1 and /api routes.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, mode: "qa", attn: null, focus: null, focusToken: null, abort: null };

const PRESETS = [
  "Sarah lost her keys, so John lent her his spare set.",
  "John told Mary that he would call her tomorrow.",
  "The ball rolled down the hill. It stopped at the fence.",
  "The trophy did not fit in the suitcase because it was too big.",
  "Anna gave the book to her brother because he wanted to read it.",
  "The dog chased the cat until it climbed a tree.",
];

// ------------------------------------------------------------------ helpers

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error((data.error && data.error.message) || `HTTP ${res.status}`);
  return data;
}

function fmtBytes(n) {
  if (n === undefined || n === null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fillKv(el, pairs) {
  el.innerHTML = "";
  for (const [k, v] of pairs) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    el.append(dt, dd);
  }
}

function setOptions(select, options, keep) {
  const old = select.value;
  select.innerHTML = "";
  for (const [value, label] of options) {
    const o = document.createElement("option"); o.value = value; o.textContent = label; select.append(o);
  }
  if (keep && options.some(([v]) => v === old)) select.value = old;
}

// ------------------------------------------------------------------ model / checkpoint

async function loadInfo() {
  const info = await api("/api/info");
  state.info = info;
  $("run-name").textContent = info.run;
  const sw = $("checkpoint-switch");
  sw.innerHTML = "";
  const label = { best: "fine-tuned (best)", last: "last", pretrained: "pretrained" };
  for (const c of info.checkpoints) {
    const b = document.createElement("button");
    b.textContent = label[c.id] || c.id;
    b.title = c.stage ? `${c.id}: ${c.stage} checkpoint` : c.id;
    b.dataset.checkpoint = c.id;
    b.className = c.active ? "active" : "";
    b.onclick = () => switchCheckpoint(c.id);
    sw.append(b);
  }
  const m = info.model;
  $("model-meta").textContent = `${(m.parameters / 1e6).toFixed(2)}M params`;
  fillKv($("model-info"), [
    ["checkpoint", info.active], ["parameters", m.parameters.toLocaleString()], ["layers", m.n_layer],
    ["heads", m.n_head], ["n_embd", m.n_embd], ["block", m.block_size], ["vocab", m.vocab_size],
  ]);
  if (!state.answerStyleSet) {  // the run's eval.decoding, once: a later checkpoint switch keeps the user's choice
    $("answer-style").value = info.answering && info.answering.decoding === "span" ? "span" : "sample";
    state.answerStyleSet = true;
  }
  const mt = $("max_tokens");
  mt.max = info.limits.max_tokens;
  if (+mt.value > info.limits.max_tokens) mt.value = info.limits.max_tokens;
  setOptions($("attn-layer"), [["all", "mean of layers"], ...Array.from({ length: m.n_layer }, (_, i) => [String(i), `layer ${i + 1}`])], true);
  setOptions($("attn-head"), [["mean", "mean of heads"], ...Array.from({ length: m.n_head }, (_, i) => [String(i), `head ${i + 1}`])], true);
  setOptions($("focus-layer"), [["all", "mean of layers"], ...Array.from({ length: m.n_layer }, (_, i) => [String(i), `layer ${i + 1}`])], true);
  showValues();
}

async function switchCheckpoint(id) {
  $("gen-status").textContent = `loading ${id}…`;
  try {
    await api("/api/checkpoint", { checkpoint: id });
    await loadInfo();
    // the pretrained model never learnt the QA format: free text suits it
    setMode(id === "pretrained" ? "text" : "qa");
    $("gen-status").textContent = `now serving ${id}`;
    if (state.attn) analyse();
  } catch (e) { $("gen-status").textContent = e.message; }
}

// ------------------------------------------------------------------ generation

const SLIDERS = ["temperature", "top_k", "top_p", "repetition_penalty", "max_tokens", "min_tokens"];

function showValues() {
  for (const id of SLIDERS) {
    const v = +$(id).value;
    let text = String(v);
    if (id === "top_k" && v === 0) text = "off";
    else if (id === "top_p" && v >= 1) text = "off";
    else if (id === "repetition_penalty" && v === 1) text = "off";
    else if (id === "temperature" && v === 0) text = "0 (greedy)";
    else if (id === "min_tokens" && v === 0) text = "off";
    $(`${id}-v`).textContent = text;
  }
}

function setMode(mode) {
  state.mode = mode;
  for (const b of $("mode-switch").querySelectorAll("button")) b.classList.toggle("active", b.dataset.mode === mode);
  $("qa-inputs").hidden = mode !== "qa";
  $("text-inputs").hidden = mode !== "text";
  $("mode-hint").textContent = mode === "qa"
    ? "Answers in the fine-tuned QA format: optional context, then the question."
    : "Continues the text as a plain language model (best with the pretrained checkpoint).";
}

function requestBody() {
  const body = {
    stream: true, stream_options: { include_usage: true },
    temperature: +$("temperature").value, top_k: +$("top_k").value, top_p: +$("top_p").value,
    repetition_penalty: +$("repetition_penalty").value, max_tokens: +$("max_tokens").value,
    min_tokens: Math.min(+$("min_tokens").value, +$("max_tokens").value),
  };
  if ($("seed").value !== "") body.seed = Math.floor(+$("seed").value);
  if (state.mode === "qa") {
    body.messages = [{ role: "user", content: $("question").value }];
    const ctx = $("context").value.trim();
    if (ctx) body.context = ctx;
    if (ctx && $("answer-style").value === "span") body.decoding = "span";  // without a context: generated
  } else {
    body.prompt = $("prompt").value;
  }
  return body;
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function generate() {
  const body = requestBody();
  const qa = state.mode === "qa";
  const out = $("output");
  out.className = "output";
  out.innerHTML = "";
  const answer = document.createElement("span");
  if (!qa) { const p = document.createElement("span"); p.className = "prompt"; p.textContent = body.prompt; out.append(p); }
  out.append(answer);
  $("focus-card").hidden = true;
  $("generate").disabled = true; $("stop").disabled = false;
  $("gen-status").textContent = "waiting…";
  state.abort = new AbortController();
  const t0 = performance.now();
  let tFirst = null, pieces = 0, usage = null, finish = null, text = "";
  const stats = () => {
    const now = performance.now();
    const n = usage ? usage.completion_tokens : pieces;
    // tokens after the first, over the time since it came; an answer in one piece (a span): over the whole wait
    const rate = pieces > 1 && now > tFirst ? (n - 1) / ((now - tFirst) / 1000) : tFirst ? n / ((now - t0) / 1000) : 0;
    $("gen-stats").textContent = `${n} tokens · ${rate.toFixed(1)} tokens/s · first token ${tFirst ? Math.round(tFirst - t0) : "–"} ms` + (finish ? ` · ${finish}` : "");
  };
  try {
    const res = await fetch(qa ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: state.abort.signal,
    });
    if (!res.ok) { const e = await res.json().catch(() => ({})); throw new Error((e.error && e.error.message) || `HTTP ${res.status}`); }
    $("gen-status").textContent = "generating…";
    for await (const chunk of sseEvents(res)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) { stats(); continue; }
      const piece = qa ? (choice.delta && choice.delta.content) || "" : choice.text || "";
      if (piece) {
        if (tFirst === null) tFirst = performance.now();
        pieces++;
        text += piece;
        answer.textContent = qa ? text.trimStart() : text;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      stats();
    }
    $("gen-status").textContent = "done";
    stats();
    if (text.trim()) showFocus(body, text);
  } catch (e) {
    if (e.name === "AbortError") { $("gen-status").textContent = "stopped"; }
    else { out.classList.add("error"); out.textContent = e.message; $("gen-status").textContent = "error"; }
  } finally {
    $("generate").disabled = false; $("stop").disabled = true; state.abort = null;
  }
}

// ------------------------------------------------------------------ input focus (bars)

// show whitespace-only tokens (newlines, spaces) so their chips are not blank
const visible = (t) => (t.trim() ? t : t.replace(/\n/g, "↵").replace(/ /g, "␣").replace(/\t/g, "⇥") || "∅");

async function showFocus(body, completion) {
  const req = { completion, discount_first: $("focus-discount").checked };
  if (body.messages) {  // the prompt the answer was made from: same decoding, same room for it (a long context: same window)
    req.question = body.messages[0].content; req.decoding = body.decoding || "sample"; req.max_tokens = body.max_tokens;
    if (body.context) req.context = body.context;
  } else req.text = body.prompt;
  try {
    const data = await api("/api/attention", req);
    state.focus = data;
    state.focusRequest = { body, completion };
    state.focusToken = null;
    renderFocus();
    $("focus-card").hidden = false;
  } catch (e) {
    $("gen-status").textContent = `input focus: ${e.message}`;
  }
}

function renderFocus() {
  const data = state.focus;
  if (!data || !data.focus) return;
  const f = data.focus;
  const chips = $("focus-tokens");
  chips.innerHTML = "";
  f.tokens.forEach((t, i) => {
    const c = document.createElement("span");
    c.className = "chip" + (state.focusToken === i ? " active" : "");
    c.textContent = visible(t);
    c.onclick = () => { state.focusToken = state.focusToken === i ? null : i; renderFocus(); };
    chips.append(c);
  });
  const layer = $("focus-layer").value;
  const layers = layer === "all" ? f.per_layer : [f.per_layer[+layer]];
  const tokens = state.focusToken === null ? f.tokens.map((_, i) => i) : [state.focusToken];
  const values = data.words.map((_, w) => {
    let s = 0;
    for (const L of layers) for (const t of tokens) s += L[t][w];
    return s / (layers.length * tokens.length);
  });
  const peak = Math.max(...values, 1e-9);
  const bars = $("focus-bars");
  bars.innerHTML = "";
  data.words.forEach((w, i) => {
    const label = document.createElement("div");
    label.className = "bar-label" + (w.startsWith("<|") ? " special" : "");
    label.textContent = w;
    const track = document.createElement("div"); track.className = "bar-track";
    const bar = document.createElement("div"); bar.className = "bar";
    bar.style.width = `${(100 * values[i] / peak).toFixed(1)}%`;
    track.append(bar);
    const v = document.createElement("div"); v.className = "bar-value"; v.textContent = values[i].toFixed(3);
    bars.append(label, track, v);
  });
}

// ------------------------------------------------------------------ attention explorer (heatmap)

// viridis, sampled: dark purple (low) -> yellow (high)
const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
  [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]];

function colour(v) {
  v = Math.min(Math.max(v, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(v), VIRIDIS.length - 2), f = v - i;
  const a = VIRIDIS[i], b = VIRIDIS[i + 1];
  return `rgb(${a.map((x, k) => Math.round(x + f * (b[k] - x))).join(",")})`;
}

async function analyse() {
  const text = $("attn-text").value;
  $("attn-info").textContent = "analysing…";
  try {
    state.attn = await api("/api/attention", {
      text, log_scale: $("attn-log").checked, normalize: $("attn-norm").checked, discount_first: $("attn-discount").checked,
    });
    $("attn-info").textContent = `${state.attn.words.length} words · ${state.attn.tokens.length} tokens`;
    renderAttention();
  } catch (e) {
    $("attn-info").textContent = e.message;
  }
}

function currentMatrix() {
  const a = state.attn, layer = $("attn-layer").value, head = $("attn-head").value;
  $("attn-head").disabled = layer === "all";
  if (layer === "all") return { m: a.layers_mean, top: a.top.layers_mean };
  if (head === "mean") return { m: a.mean[+layer], top: a.top.mean[+layer] };
  return { m: a.per_head[+layer][+head], top: a.top.per_head[+layer][+head] };
}

function renderAttention() {
  if (!state.attn) return;
  const words = state.attn.words;
  const { m, top } = currentMatrix();
  const canvas = $("heatmap");
  const ctx = canvas.getContext("2d");
  const font = "12px system-ui, sans-serif";
  ctx.font = font;
  const labelW = Math.ceil(Math.max(...words.map((w) => ctx.measureText(w).width))) + 12;
  const n = words.length;
  const avail = Math.max(canvas.parentElement.clientWidth - labelW - 10, 120);
  const cell = Math.max(14, Math.min(40, Math.floor(avail / n)));
  const width = labelW + cell * n + 4, height = labelW + cell * n + 4;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = width * dpr; canvas.height = height * dpr;
  canvas.style.width = `${width}px`; canvas.style.height = `${height}px`;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = font;
  let peak = 0;
  for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) peak = Math.max(peak, m[i][j]);
  peak = peak || 1;
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const x = labelW + j * cell, y = labelW + i * cell;
      ctx.fillStyle = j > i ? "#f1f2f5" : colour(m[i][j] / peak);
      ctx.fillRect(x, y, cell - 1, cell - 1);
    }
    if (top[i] !== null && top[i] !== undefined) {  // ring the most attended word of each row
      ctx.strokeStyle = "#ff4d4f"; ctx.lineWidth = 2;
      ctx.strokeRect(labelW + top[i] * cell + 1, labelW + i * cell + 1, cell - 3, cell - 3);
    }
  }
  ctx.fillStyle = "#1d2330";
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  words.forEach((w, i) => ctx.fillText(w, labelW - 6, labelW + i * cell + cell / 2));
  ctx.save();
  ctx.textAlign = "left";
  words.forEach((w, j) => {
    ctx.save();
    ctx.translate(labelW + j * cell + cell / 2, labelW - 6);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(w, 0, 0);
    ctx.restore();
  });
  ctx.restore();
  state.geometry = { labelW, cell, n, m, peak };
  $("legend-max").textContent = peak.toFixed(3);
  drawLegend();
  renderTopList(words, top);
}

function drawLegend() {
  const c = $("legend"), ctx = c.getContext("2d");
  for (let x = 0; x < c.width; x++) { ctx.fillStyle = colour(x / (c.width - 1)); ctx.fillRect(x, 0, 1, c.height); }
}

function renderTopList(words, top) {
  const list = $("top-list");
  list.innerHTML = "";
  words.forEach((w, i) => {
    const li = document.createElement("li");
    const src = document.createElement("span"); src.textContent = w;
    const arrow = document.createElement("span"); arrow.className = "arrow"; arrow.textContent = "→";
    const dst = document.createElement("span"); dst.className = "target";
    dst.textContent = top[i] === null || top[i] === undefined ? "–" : words[top[i]];
    li.append(src, arrow, dst);
    list.append(li);
  });
}

function heatmapHover(ev) {
  const g = state.geometry, tip = $("tooltip");
  if (!g) return;
  const rect = $("heatmap").getBoundingClientRect();
  const x = ev.clientX - rect.left, y = ev.clientY - rect.top;
  const j = Math.floor((x - g.labelW) / g.cell), i = Math.floor((y - g.labelW) / g.cell);
  if (i < 0 || j < 0 || i >= g.n || j >= g.n || j > i) { tip.hidden = true; return; }
  const words = state.attn.words;
  tip.textContent = `${words[i]} → ${words[j]}: ${g.m[i][j].toFixed(4)}`;
  tip.style.left = `${x + 14}px`; tip.style.top = `${y + 10}px`;
  tip.hidden = false;
}

// ------------------------------------------------------------------ memory

async function refreshMemory() {
  try {
    const m = await api("/api/memory");
    const models = Object.entries(m.models);
    const pairs = [
      ["process RSS", fmtBytes(m.process.rss_bytes)],
      ["system available", `${fmtBytes(m.system.available_bytes)} of ${fmtBytes(m.system.total_bytes)}`],
      ["torch tensors", `${m.torch.tensors.count} · ${fmtBytes(m.torch.tensors.bytes)}`],
      ["Python objects", m.python.gc_objects.toLocaleString()],
      ...models.map(([name, s]) => [`model ${name}`, fmtBytes(s.bytes)]),
    ];
    if (models.length) pairs.push(["KV cache / request", fmtBytes(models[0][1].kv_cache_bytes_per_request)]);
    if (m.cuda) pairs.push(["CUDA allocated", fmtBytes(m.cuda.allocated_bytes)], ["CUDA reserved", fmtBytes(m.cuda.reserved_bytes)]);
    fillKv($("memory"), pairs);
  } catch (e) { $("memory-note").textContent = e.message; }
}

async function freeMemory() {
  $("free-memory").disabled = true;
  try {
    const r = await api("/api/memory/free", {});
    const unloaded = r.unloaded_checkpoints.length ? `; unloaded ${r.unloaded_checkpoints.join(", ")}` : "";
    $("memory-note").textContent = `freed ${fmtBytes(r.freed_bytes)} (gc collected ${r.gc_collected} objects${unloaded})`;
    await refreshMemory();
    await loadInfo();
  } catch (e) { $("memory-note").textContent = e.message; }
  $("free-memory").disabled = false;
}

// ------------------------------------------------------------------ wiring

function showTab(name) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.tab === name);
  $("panel-generate").hidden = name !== "generate";
  $("panel-attention").hidden = name !== "attention";
  if (name === "attention" && !state.attn) analyse();
  else if (name === "attention") renderAttention();
}

function init() {
  for (const t of document.querySelectorAll(".tab")) t.onclick = () => showTab(t.dataset.tab);
  for (const b of $("mode-switch").querySelectorAll("button")) b.onclick = () => setMode(b.dataset.mode);
  for (const id of SLIDERS) $(id).addEventListener("input", showValues);
  $("generate").onclick = generate;
  $("stop").onclick = () => state.abort && state.abort.abort();
  $("question").addEventListener("keydown", (e) => { if (e.key === "Enter") generate(); });
  const presets = $("presets");
  for (const p of PRESETS) { const o = document.createElement("option"); o.value = p; o.textContent = p; presets.append(o); }
  presets.onchange = () => { if (presets.value) { $("attn-text").value = presets.value; analyse(); } };
  $("analyse").onclick = analyse;
  for (const id of ["attn-log", "attn-norm", "attn-discount"]) $(id).onchange = analyse;
  for (const id of ["attn-layer", "attn-head"]) $(id).onchange = renderAttention;
  $("focus-layer").onchange = renderFocus;
  $("focus-discount").onchange = () => state.focusRequest && showFocus(state.focusRequest.body, state.focusRequest.completion);
  $("heatmap").addEventListener("mousemove", heatmapHover);
  $("heatmap").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  window.addEventListener("resize", () => state.attn && !$("panel-attention").hidden && renderAttention());
  $("free-memory").onclick = freeMemory;
  showValues();
  loadInfo().catch((e) => { $("gen-status").textContent = e.message; });
  refreshMemory();
  setInterval(refreshMemory, 5000);
}

init();
