// The page at /: pick or drop an image, classify it through POST /v2/models/{name}/infer
// (BYTES image in base64, Triton's classification extension for the top-k), show the bars, this
// request's latency, and what the sparse model saves against its dense twin (GET /stats).
"use strict";
const TOP_K = 5;
const $ = (id) => document.getElementById(id);

async function loadModels() {
  const r = await fetch("/v2/repository/index", {method: "POST", body: JSON.stringify({ready: true})});
  const rows = r.ok ? await r.json() : [];
  $("model").replaceChildren(...rows.map((m) => new Option(`${m.name} (version ${m.version})`, m.name)));
  if (!rows.length) $("error").textContent = "no model is ready yet; reload in a moment";
}

function base64(buffer) {
  let s = "";
  const bytes = new Uint8Array(buffer);
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function showBars(rows) {
  $("bars").replaceChildren(...rows.map(({p, label}) => {
    const row = document.createElement("div");
    row.className = "row";
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.textContent = `${(100 * p).toFixed(1)}%`;
    row.append(name, bar, value);
    return row;
  }));
}

async function classify(file) {
  $("error").textContent = "";
  $("preview").src = URL.createObjectURL(file);
  $("preview").style.display = "inline";
  const model = $("model").value;
  const body = JSON.stringify({
    inputs: [{name: "image_bytes", datatype: "BYTES", shape: [1], data: [base64(await file.arrayBuffer())]}],
    outputs: [{name: "probabilities", parameters: {classification: TOP_K}}],
  });
  const started = performance.now();
  const r = await fetch(`/v2/models/${encodeURIComponent(model)}/infer`,
                        {method: "POST", headers: {"content-type": "application/json"}, body});
  const answer = await r.json();
  const roundTrip = performance.now() - started;
  if (!r.ok) {
    $("result").hidden = true;
    $("error").textContent = answer.error || answer.detail || `HTTP ${r.status}`;
    return;
  }
  // classification elements are "<probability>:<class index>:<label>"
  const rows = answer.outputs[0].data.map((s) => {
    const [p, index, ...label] = s.split(":");
    return {p: Number(p), index: Number(index), label: label.join(":")};
  });
  showBars(rows);
  $("top1").textContent = rows[0].label;
  const t = answer.parameters || {};
  $("latency").textContent = `this request: ${roundTrip.toFixed(1)} ms in the browser, ` +
    `${(t.latency_ms ?? 0).toFixed(1)} ms in the server (queue ${(t.queue_ms ?? 0).toFixed(1)} ms, ` +
    `forward pass ${(t.inference_ms ?? 0).toFixed(1)} ms), model ${answer.model_name} version ${answer.model_version}`;
  $("result").hidden = false;
}

async function loadSavings() {
  const r = await fetch("/stats");
  if (!r.ok) { $("savings").textContent = "/stats is not available"; return; }
  const c = (await r.json()).calibration || {};
  if (c.status === "done") {
    $("savings").textContent = c.summary;
  } else if (c.status === "failed") {
    $("savings").textContent = `the measurement failed: ${c.error}`;
  } else {
    $("savings").textContent = "measuring the sparse model against its dense twin ...";
    setTimeout(loadSavings, 2000);
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => {
  if (e.target.files.length) classify(e.target.files[0]);
  e.target.value = "";  // picking the same file again classifies it again
});
loadModels().catch((e) => { $("error").textContent = String(e); });
loadSavings().catch(() => { $("savings").textContent = "/stats is not available"; });
