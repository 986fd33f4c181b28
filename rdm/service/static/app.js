// rdm serve page: plain JS, no build step. Talks to the same API as any client (see /docs).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, databases: [], upload: null, job: null, source: null, history: [],
                init: null, photo: null, mask: null, painted: false };

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error("the service cannot be reached (is rdm serve still running?)");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    let msg = (body && body.error) || `HTTP ${response.status}`;
    if (response.status === 429) msg += ` (retry in ${response.headers.get("Retry-After") || "a few"} s)`;
    const error = new Error(msg);
    error.status = response.status;
    throw error;
  }
  return body;
}

// -- set-up ---------------------------------------------------------------------------------------
// the key: from the link rdm serve printed (#key=..., a fragment no server sees) or typed in; kept in an
// HttpOnly cookie the service sets (POST /api/session), so that images load with it too
async function useKey(key) {
  await api("/api/session", { method: "POST", headers: { "Content-Type": "application/json" },
                              body: JSON.stringify({ key }) });
}

async function init() {
  $("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try { await useKey($("key").value.trim()); location.reload(); } catch (e) { showError(e.message); }
  });
  window.addEventListener("hashchange", () => {  // the link opened over this page: only its fragment changed
    if (new URLSearchParams(location.hash.slice(1)).get("key")) location.reload();
  });
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("key");
  if (fromLink) {
    history.replaceState(null, "", location.pathname + location.search);  // not left in the address bar
    try { await useKey(fromLink); } catch (e) { showError(e.message); }
  }
  try {
    state.info = await api("/api/info");
    const m = state.info.model;
    $("model-info").textContent = `model ${m.name} · ${m.resolution}px · CLIP ${m.embedder} · default k ${m.k}` +
                                  ` · key ${state.info.you.key}`;
    $("k").value = m.k; $("k").max = state.info.limits.max_k;
    // the model's own sampler settings (its rdm_config.json "sampling"), as rdm sample uses them
    $("steps").value = state.info.defaults.steps; $("steps").max = state.info.limits.max_steps;
    $("guidance").value = state.info.defaults.guidance;
    $("guidance-rescale").value = state.info.defaults.guidance_rescale;
    $("num-images").max = state.info.limits.max_images;
    state.databases = (await api("/api/databases")).filter((d) => d.compatible);
    renderDatabases();
    renderAdapters();
    $("curate-db").replaceChildren(...state.databases.map((d) => el("option", { value: d.name, text: `${d.name} (${d.count})` })));
    $("curate-box").hidden = !state.databases.length;
  } catch (e) {
    if (e.status === 401) { $("login").hidden = false; $("model-info").textContent = "a key is needed"; }
    showError(e.message);
  }
  $("controls").addEventListener("submit", (ev) => { ev.preventDefault(); submit("generate"); });
  $("compare").addEventListener("click", () => submit("compare"));
  $("cancel").addEventListener("click", cancel);
  $("curate").addEventListener("click", curateCollection);
  $("diversity").addEventListener("input", () => { $("diversity-value").textContent = Number($("diversity").value).toFixed(2); });
  $("image-file").addEventListener("change", uploadImage);
  $("clear-image").addEventListener("click", clearImage);
  $("init-file").addEventListener("change", uploadPhoto);
  $("clear-init").addEventListener("click", clearPhoto);
  $("strength").addEventListener("input", () => { $("strength-value").textContent = Number($("strength").value).toFixed(2); });
  $("clear-mask").addEventListener("click", clearMask);
  const canvas = $("mask-canvas");
  canvas.addEventListener("pointerdown", (ev) => { canvas.setPointerCapture(ev.pointerId); paint(ev); });
  canvas.addEventListener("pointermove", (ev) => { if (ev.buttons & 1) paint(ev); });
}

// -- a photo to restyle, and the mask painted over it ------------------------------------------
async function uploadPhoto() {
  const file = $("init-file").files[0];
  if (!file) return;
  showError("");
  const form = new FormData();
  form.append("file", file);
  try {
    const res = await api("/api/uploads", { method: "POST", body: form });
    state.init = { id: res.upload, name: file.name };
    const photo = new Image();
    photo.src = URL.createObjectURL(file);
    await photo.decode();
    state.photo = photo;
    const scale = 256 / Math.max(photo.naturalWidth, photo.naturalHeight);
    const canvas = $("mask-canvas");
    canvas.width = Math.max(1, Math.round(photo.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(photo.naturalHeight * scale));
    state.mask = document.createElement("canvas");  // white = redraw, on black; uploaded as the mask
    state.mask.width = canvas.width; state.mask.height = canvas.height;
    state.overlay = document.createElement("canvas");  // what the person sees of the mask
    state.overlay.width = canvas.width; state.overlay.height = canvas.height;
    clearMask();
    $("mask-box").hidden = false; $("clear-init").hidden = false;
  } catch (e) {
    clearPhoto();
    showError(`cannot use ${file.name}: ${e.message}`);
  }
}

function clearPhoto() {
  state.init = null; state.photo = null; state.mask = null; state.overlay = null; state.painted = false;
  $("init-file").value = "";
  $("mask-box").hidden = true; $("clear-init").hidden = true;
}

function clearMask() {
  if (!state.mask) return;
  const m = state.mask.getContext("2d");
  m.fillStyle = "#000"; m.fillRect(0, 0, state.mask.width, state.mask.height);
  state.overlay.getContext("2d").clearRect(0, 0, state.overlay.width, state.overlay.height);
  state.painted = false;
  $("mask-info").textContent = "paint what to redraw; nothing painted restyles the whole photo";
  drawPhoto();
}

function drawPhoto() {
  const canvas = $("mask-canvas"), c = canvas.getContext("2d");
  c.globalAlpha = 1;
  c.drawImage(state.photo, 0, 0, canvas.width, canvas.height);
  if (state.painted) { c.globalAlpha = 0.45; c.drawImage(state.overlay, 0, 0); c.globalAlpha = 1; }  // painted: red
}

function paint(ev) {
  if (!state.mask) return;
  const canvas = $("mask-canvas"), box = canvas.getBoundingClientRect();
  const x = (ev.clientX - box.left) * canvas.width / box.width, y = (ev.clientY - box.top) * canvas.height / box.height;
  const m = state.mask.getContext("2d");
  const r = Number($("brush").value) / 2;
  m.fillStyle = "#fff"; m.beginPath(); m.arc(x, y, r, 0, 2 * Math.PI); m.fill();
  const o = state.overlay.getContext("2d");
  o.fillStyle = "rgba(255, 40, 40, 1)"; o.beginPath(); o.arc(x, y, r, 0, 2 * Math.PI); o.fill();
  state.painted = true;
  $("mask-info").textContent = "inpainting: only the painted region is redrawn";
  drawPhoto();
}

async function editFields() {
  if (!state.init) return {};
  const fields = { init_image: { upload: state.init.id }, strength: Number($("strength").value) };
  if (state.painted) {
    const blob = await new Promise((resolve) => state.mask.toBlob(resolve, "image/png"));
    const form = new FormData();
    form.append("file", blob, "mask.png");
    fields.mask = { upload: (await api("/api/uploads", { method: "POST", body: form })).upload };
  }
  return fields;
}

function renderDatabases() {
  const box = $("databases");
  box.replaceChildren();
  if (!state.databases.length) {
    box.append(el("span", { class: "muted", text: "no database is served: generation uses the query alone" }));
    return;
  }
  state.databases.forEach((d, i) => {
    const check = el("input", { type: "checkbox", id: `db-${i}`, "data-name": d.name });
    if (i === 0) check.checked = true;
    const slider = el("input", { type: "range", min: "0", max: "1", step: "0.05", value: "1", id: `w-${i}`,
                                 "aria-label": `weight of ${d.name}` });
    const out = el("output", { text: "1.00" });
    slider.addEventListener("input", () => { out.textContent = Number(slider.value).toFixed(2); });
    const label = el("label", { for: `db-${i}`, title: `${d.count} items · ${d.fingerprint}` },
                     [check, ` ${d.name} `, el("span", { class: "muted", text: `(${d.count})` })]);
    const avoid = el("label", { class: "avoid", title: `guide the images away from ${d.name} (a negative collection)` },
                     [el("input", { type: "checkbox", id: `neg-${i}`, "data-name": d.name }), " avoid"]);
    box.append(el("div", { class: "db" }, [label, slider, out, avoid]));
  });
}

function renderAdapters() {
  const adapters = state.info.adapters || [];
  $("adapters-box").hidden = !adapters.length;
  $("adapters").replaceChildren(...adapters.map((a, i) => {
    const check = el("input", { type: "checkbox", id: `ad-${i}`, "data-name": a.name });
    const slider = el("input", { type: "range", min: "0", max: "1.5", step: "0.05", value: "1", id: `adw-${i}`,
                                 "aria-label": `weight of adapter ${a.name}` });
    const out = el("output", { text: "1.00" });
    slider.addEventListener("input", () => { out.textContent = Number(slider.value).toFixed(2); });
    const label = el("label", { for: `ad-${i}`, title: `rank ${a.rank} · ${a.targets} · trained on ${a.database}` },
                     [check, ` ${a.name} `, el("span", { class: "muted", text: `(${a.database})` })]);
    return el("div", { class: "db" }, [label, slider, out]);
  }));
}

function chosenAdapters() {
  return (state.info.adapters || []).map((a, i) => ({ name: a.name, check: $(`ad-${i}`), weight: Number($(`adw-${i}`).value) }))
    .filter((a) => a.check.checked && a.weight !== 0).map(({ name, weight }) => ({ name, weight }));
}

function chosenDatabases() {
  return state.databases.map((d, i) => ({ name: d.name, check: $(`db-${i}`), weight: Number($(`w-${i}`).value) }))
    .filter((d) => d.check.checked && d.weight > 0).map(({ name, weight }) => ({ name, weight }));
}

function negativeDatabases() {
  return state.databases.filter((d, i) => $(`neg-${i}`).checked).map((d) => ({ name: d.name }));
}

function numberOf(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

async function uploadImage() {
  const file = $("image-file").files[0];
  if (!file) return;
  showError("");
  const form = new FormData();
  form.append("file", file);
  try {
    const res = await api("/api/uploads", { method: "POST", body: form });
    state.upload = { id: res.upload, name: file.name };
    $("image-query").textContent = `image query: ${file.name} (${res.width}×${res.height})`;
    $("clear-image").hidden = false;
  } catch (e) {
    clearImage();
    showError(`cannot use ${file.name}: ${e.message}`);
  }
}

function clearImage() {
  state.upload = null;
  $("image-file").value = "";
  $("image-query").textContent = "";
  $("clear-image").hidden = true;
}

// -- jobs -----------------------------------------------------------------------------------------
async function submit(kind) {
  showError("");
  const prompt = $("prompt").value.trim();
  const common = { k: numberOf("k"), seed: numberOf("seed") ?? 0, steps: numberOf("steps"),
                   guidance: numberOf("guidance"), guidance_rescale: numberOf("guidance-rescale"),
                   diversity: Number($("diversity").value), negative_databases: negativeDatabases(), adapters: chosenAdapters(),
                   num_images: numberOf("num-images") ?? 1 };
  let path, body;
  if (kind === "compare") {
    if (!prompt && !state.init) return showError("compare needs a prompt or a photo to restyle");
    const rows = chosenDatabases().map((d) => [{ name: d.name, weight: 1 }]);
    rows.push([]);  // the control: the query alone
    path = "/api/compare"; body = { ...(prompt ? { prompt } : {}), rows, ...common };
  } else {
    if (!prompt && !state.upload && !state.init) return showError("type a prompt or choose an image");
    const query = prompt ? { prompt } : state.upload ? { image: { upload: state.upload.id } } : {};
    const databases = chosenDatabases();
    path = "/api/generate"; body = { ...query, databases, ...common };
    if (!databases.length) body.k = 0;
  }
  setBusy(true);
  try {
    Object.assign(body, await editFields());
    const job = await api(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify(body) });
    addHistory(job, prompt || (state.upload && state.upload.name) || (state.init && `restyle ${state.init.name}`));
    follow(job);
  } catch (e) {
    setBusy(false);
    showError(e.message);
  }
}

function setBusy(busy) {
  $("generate").disabled = busy; $("compare").disabled = busy; $("cancel").hidden = !busy;
  $("progress").hidden = !busy;
}

function follow(job) {
  state.job = job;
  if (state.source) state.source.close();
  showProgress(job);
  const source = new EventSource(job.events_url);
  state.source = source;
  const update = (ev) => { const view = JSON.parse(ev.data); showProgress(view); if (view.images.length) render(view); };
  source.addEventListener("progress", update);
  for (const final of ["done", "failed", "cancelled"]) {
    source.addEventListener(final, (ev) => { source.close(); finished(JSON.parse(ev.data)); });
  }
  source.onerror = () => { source.close(); poll(job.id); };
}

async function poll(id) {
  try {
    const view = await api(`/api/jobs/${id}`);
    showProgress(view);
    if (["done", "failed", "cancelled"].includes(view.state)) return finished(view);
    setTimeout(() => poll(id), 500);
  } catch (e) {
    setBusy(false); showError(e.message);
  }
}

function showProgress(view) {
  $("progress").value = view.progress;
  const where = view.state === "queued" && view.position ? ` (${view.position} image(s) ahead)` : "";
  $("status-text").textContent = `${view.state}${where} · ${Math.round(view.progress * 100)}%`;
  updateHistory(view);
}

function finished(view) {
  setBusy(false);
  showProgress(view);
  if (view.state === "done") { render(view); $("status-text").textContent = `done · ${view.images.length} image(s)`; }
  else showError(view.error || `job ${view.state}`);
}

async function cancel() {
  if (!state.job) return;
  try { await api(`/api/jobs/${state.job.id}`, { method: "DELETE" }); } catch (e) { showError(e.message); }
}

// -- results --------------------------------------------------------------------------------------
function neighbourStrip(neighbours) {
  return el("div", { class: "neighbours" }, neighbours.map((n) => el("figure", {}, [
    el("img", { src: n.thumbnail_url, alt: `${n.database}/${n.id}`, title: `${n.database}/${n.id}  ${n.score.toFixed(3)}`,
                loading: "lazy" }),
    el("figcaption", { text: n.score.toFixed(2) })])));
}

function provenanceLink(image) {
  return el("a", { class: "provenance", href: image.provenance_url, download: "", text: "provenance" });
}

function render(view) {
  if (view.kind === "compare") return renderCompare(view);  // the last generation's grid stays above it
  const box = $("results");
  box.replaceChildren(...view.images.map((im) => el("div", { class: "card" }, [
    el("img", { class: "sample", src: im.image_url, alt: `seed ${im.seed}` }),
    el("div", { class: "meta" }, [el("span", { text: `seed ${im.seed} · ${im.row}` }),
                                  el("span", {}, [el("a", { href: im.image_url, download: "", text: "PNG" }), " · ",
                                                  provenanceLink(im)])]),
    neighbourStrip(im.neighbours),
    ...nearCopy(im),
    ...im.warnings.map((w) => el("div", { class: "warn", text: w }))])));
}

function nearCopy(image) {
  const c = image.near_copy;
  if (!c) return [];
  const item = [c.item?.database, c.item?.id ?? c.item?.ref].filter((x) => x != null).join("/");
  return [el("div", { class: "warn near-copy", text: `near-copy of ${item} (similarity ${c.similarity.toFixed(3)}, ` +
                                                      `threshold ${c.threshold})` })];
}

function renderCompare(view) {
  const box = $("compare-view");
  box.hidden = false;
  const table = el("table", { class: "compare" });
  view.labels.forEach((label) => {
    const images = view.images.filter((im) => im.row === label);
    const first = images[0];
    table.append(el("tr", {}, [
      el("th", { text: label }),
      el("td", {}, [first ? neighbourStrip(first.neighbours) : el("span", { class: "muted", text: "…" })]),
      ...images.map((im) => el("td", {}, [el("img", { class: "sample", src: im.image_url, alt: `${label} seed ${im.seed}` }),
                                          el("div", { class: "meta" }, [el("span", { text: `seed ${im.seed}` }),
                                                                       provenanceLink(im)]), ...nearCopy(im)]))]));
  });
  const all = el("a", { href: `/api/jobs/${view.id}/provenance.json`, download: "", text: "all provenance (JSON)" });
  box.replaceChildren(el("h2", { text: `compare: ${view.request.prompt}` }), table, all);
}

// -- curation -------------------------------------------------------------------------------------
function thumb(item, title) {
  return el("img", { src: item.thumbnail_url, alt: item.id, title: title || item.id, loading: "lazy" });
}

async function curateCollection() {
  const name = $("curate-db").value;
  if (!name) return;
  showError("");
  const box = $("curate-view");
  box.hidden = false;
  box.replaceChildren(el("h2", { text: `curating ${name}…` }));
  $("curate").disabled = true;
  try {
    renderCuration(await api(`/api/databases/${encodeURIComponent(name)}/curate`));
  } catch (e) {
    box.replaceChildren();
    box.hidden = true;
    showError(e.message);
  } finally {
    $("curate").disabled = false;
  }
}

function renderCuration(r) {
  const c = r.coherence;
  const groups = r.duplicate_groups.map((g) => el("div", { class: "row group" }, [
    el("figure", { class: "keep" }, [thumb(g.keep, `kept: ${g.keep.id}`), el("figcaption", { text: "kept" })]),
    ...g.drop.map((d) => el("figure", {}, [thumb(d, `copy: ${d.id}`), el("figcaption", { text: d.id })])),
    el("span", { class: "muted", text: `cosine ${g.similarity.toFixed(3)}` })]));
  const outliers = r.outliers.map((o) => el("div", { class: "row outlier" }, [
    el("figure", { class: "flagged" }, [thumb(o.item), el("figcaption", { text: `${o.item.id} · ${o.score.toFixed(1)}` })]),
    el("span", { class: "muted", text: "nearest:" }),
    ...o.nearest.map((n) => el("figure", {}, [thumb(n), el("figcaption", { text: n.id })]))]));
  const more = (shown, all, what) => all > shown ? [el("p", { class: "muted", text: `… and ${all - shown} more ${what}` })] : [];
  $("curate-view").replaceChildren(
    el("h2", { text: `curate: ${r.database}` }),
    el("p", { class: "muted", text: `${r.count} items · coherence: k-NN similarity ${c.knn_similarity?.toFixed(3)}, ` +
              `to the centroid ${c.centroid_similarity.toFixed(3)} (k ${r.k})` }),
    el("h3", { id: "curate-duplicates", text: `Near-duplicate groups (${r.duplicate_group_count}, ` +
               `${r.duplicate_count} copies at cosine ≥ ${r.duplicate_threshold})` }),
    ...groups, ...more(groups.length, r.duplicate_group_count, "groups"),
    el("h3", { id: "curate-outliers", text: `Outliers (${r.outlier_count})`, title: r.outlier_rule }),
    ...outliers, ...more(outliers.length, r.outlier_count, "outliers"),
    el("h3", { id: "curate-card", text: `Style card (${r.representatives.length} representatives)` }),
    el("div", { class: "card-grid" }, r.representatives.map((it) => thumb(it))),
    el("p", { class: "muted", text: `rdm curate ${r.database} --apply duplicates,outliers removes them (takedown path)` }));
}

// -- history --------------------------------------------------------------------------------------
function addHistory(job, label) {
  state.history.unshift({ id: job.id, label: `${job.kind === "compare" ? "compare: " : ""}${label}`, state: job.state });
  renderHistory();
}

function updateHistory(view) {
  const item = state.history.find((h) => h.id === view.id);
  if (item && item.state !== view.state) { item.state = view.state; renderHistory(); }
}

function renderHistory() {
  $("history").replaceChildren(...state.history.map((h) => {
    const li = el("li", { "data-job": h.id }, [h.label, " ", el("span", { class: "state", text: h.state })]);
    li.addEventListener("click", async () => {
      try { const view = await api(`/api/jobs/${h.id}`); showError(""); render(view); }
      catch (e) { showError(e.message); }
    });
    return li;
  }));
}

init();
