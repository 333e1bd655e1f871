// The review page: plain DOM, no framework, no network beyond this server (works air-gapped).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { classes: [] };

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = "status" + (isError ? " error" : "");
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!response.ok) {
    let detail = response.statusText;
    try { const body = await response.json(); detail = `${body.error}: ${body.detail}`; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status} ${detail}`);
  }
  return response;
}

async function loadModel() {
  try {
    const meta = await (await api("/metadata")).json();
    state.classes = meta.classes;
    const m = meta.model;
    const reject = meta.decision && meta.decision.defect_threshold;
    $("model-info").textContent = `model: ${m.name || m.uri} ${m.version ? "v" + m.version : ""} (${meta.task}); ` +
      `review below ${meta.review_threshold.toFixed(3)}` + (reject != null ? `; reject at P(defect) >= ${reject.toFixed(3)}` : "");
  } catch (err) {
    $("model-info").textContent = "model: " + err.message;
  }
}

function bars(probabilities) {
  return el("div", { class: "bars" }, Object.entries(probabilities).map(([name, p]) => {
    const fill = el("div", { class: "fill" });
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    return el("div", { class: "bar" }, [el("span", { class: "name", text: name }),
      el("span", { class: "track" }, [fill]), el("span", { class: "value", text: p.toFixed(3) })]);
  }));
}

async function drawImage(canvas, file, dots) {
  const url = URL.createObjectURL(file);
  const img = new Image();
  await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; img.src = url; });
  const scale = Math.min(1, 320 / img.width);
  canvas.width = Math.round(img.width * scale);
  canvas.height = Math.round(img.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "#00c8ff";
  ctx.lineWidth = 2;
  for (const [x, y, r] of dots) {
    ctx.beginPath();
    ctx.arc(x * scale, y * scale, Math.max(4, (r + 3) * scale), 0, 2 * Math.PI);
    ctx.stroke();
  }
  URL.revokeObjectURL(url);
}

function renderPrediction(pred, file) {
  const canvas = el("canvas", { class: "preview" });
  const head = el("div", {}, [el("span", { class: "label", text: pred.label })]);
  if (pred.decision) head.append(el("span", { class: `decision ${pred.decision}`, text: pred.decision.toUpperCase() }));
  if (pred.needs_review) head.append(el("span", { class: "review-flag", text: "needs review" }));
  const facts = el("div", { class: "facts" }, [
    head,
    el("div", { class: "muted", text: `${pred.image.filename}: confidence ${pred.confidence.toFixed(3)}` +
      (pred.p_defect != null ? `, P(defect) ${pred.p_defect.toFixed(3)} (reject at ${pred.defect_threshold.toFixed(3)})` : "") +
      `, ${pred.dots.length} pink dot(s)` }),
    bars(pred.probabilities),
    el("h4", { text: "OCR" }), el("pre", { class: "ocr", text: pred.ocr.text || "(no text)" }),
    el("pre", { class: "ocr-fields", text: JSON.stringify(pred.ocr.fields) }),
    el("h4", { text: "Description" }), el("pre", { class: "description", text: pred.texts.description || "(none)" }),
    el("h4", { text: "Reasoning" }), el("pre", { class: "reasoning", text: pred.texts.reasoning || "(none: the reasoner runs in forward mode, or said nothing)" }),
  ]);
  const card = el("div", { class: "result" }, [canvas, facts]);
  drawImage(canvas, file, pred.dots).catch(() => canvas.replaceWith(el("span", { class: "muted", text: "(no preview)" })));
  return card;
}

async function classify(event) {
  event.preventDefault();
  const files = Array.from($("files").files);
  if (!files.length) { setStatus("choose one or more images first", true); return; }
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const metadata = $("metadata").value.trim();
  if (metadata) form.append("metadata", metadata);
  setStatus(`classifying ${files.length} image(s)...`);
  try {
    const body = await (await api("/predict/batch", { method: "POST", body: form })).json();
    $("results").replaceChildren(...body.predictions.map((p, i) => renderPrediction(p, files[i])));
    setStatus(`classified ${body.count} image(s) in ${body.latency_ms.toFixed(0)} ms`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function thumbnail(rowId, cell) {
  try {
    const blob = await (await api(`/review/image/${rowId}`)).blob();
    cell.append(el("img", { src: URL.createObjectURL(blob), alt: `row ${rowId}` }));
  } catch (err) {
    cell.append(el("span", { class: "muted", text: "(image missing)" }));
  }
}

function queueRow(row, classes) {
  const select = el("select", { class: "correct-label", "data-row": String(row.row_id) },
    classes.map((c) => el("option", { value: c, text: c })));
  select.value = row.corrected_label || row.predicted_label || classes[0];
  const saved = el("span", { class: "saved", text: row.corrected_label ? `saved: ${row.corrected_label}` : "" });
  const button = el("button", { type: "button", class: "save-correction", text: "Confirm / save" });
  button.addEventListener("click", async () => {
    try {
      const response = await api("/review/corrections", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ row_id: row.row_id, label: select.value }) });
      const written = await response.json();
      saved.textContent = `saved: ${written.label}`;
      setStatus(`row ${row.row_id}: ${written.previous_label} -> ${written.label} written to the corrections table`);
    } catch (err) {
      setStatus(err.message, true);
    }
  });
  const image = el("td");
  const tr = el("tr", { class: row.needs_review ? "needs-review" : "", "data-row": String(row.row_id) }, [
    image, el("td", { text: String(row.row_id) }), el("td", { class: "predicted", text: row.predicted_label || row.error }),
    el("td", { text: row.confidence == null ? "-" : row.confidence.toFixed(3) }),
    el("td", { text: row.decision || "-" }), el("td", { text: row.needs_review ? "yes" : "" }),
    el("td", {}, [select]), el("td", {}, [button, saved]),
  ]);
  thumbnail(row.row_id, image);
  return tr;
}

async function loadQueue() {
  try {
    const body = await (await api("/review/queue")).json();
    $("queue").querySelector("tbody").replaceChildren(...body.rows.map((r) => queueRow(r, body.classes)));
    setStatus(`queue: ${body.rows.length} of ${body.total} row(s), ${body.needs_review} need review; ` +
      `corrections go to ${body.corrections_path}`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

$("api-key").value = sessionStorage.getItem("ase-ray-key") || "";
$("api-key").addEventListener("change", () => { sessionStorage.setItem("ase-ray-key", $("api-key").value); loadModel(); });
$("classify-form").addEventListener("submit", classify);
$("queue-load").addEventListener("click", loadQueue);
loadModel();
