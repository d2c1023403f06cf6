// unetseg page: pick a model, send an image, draw its mask over it. Plain JS, no dependencies.
"use strict";

(() => {
  const KEY_STORAGE = "unetseg.apiKey";
  const $ = (id) => document.getElementById(id);
  const els = {
    model: $("model"),
    modelCard: $("model-card"),
    modelDescription: $("model-description"),
    modelMeta: $("model-meta"),
    modelClasses: $("model-classes"),
    modelMetrics: $("model-metrics"),
    drop: $("drop"),
    file: $("file"),
    fileName: $("file-name"),
    opacity: $("opacity"),
    opacityValue: $("opacity-value"),
    download: $("download"),
    keyForm: $("key-form"),
    key: $("api-key"),
    keyClear: $("key-clear"),
    status: $("status"),
    error: $("error"),
    errorStatus: $("error-status"),
    errorDetail: $("error-detail"),
    errorId: $("error-id"),
    viewer: $("viewer"),
    imageLayer: $("image-layer"),
    maskLayer: $("mask-layer"),
    caption: $("caption"),
    areas: document.querySelector("#areas tbody"),
    instanceCount: $("instance-count"),
    timingTotal: $("timing-total"),
    timingSplit: $("timing-split"),
    roundtrip: $("timing-roundtrip"),
    asJob: $("as-job"),
    job: $("job"),
    jobState: $("job-state"),
    jobProgress: $("job-progress"),
    jobResults: $("job-results"),
  };

  const state = {
    models: new Map(),
    file: null,
    run: 0, // id of the latest prediction; older answers are dropped
    maskUrl: null,
    maskName: "mask.png",
  };

  // --- API ------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail, requestId) {
      super(detail);
      this.status = status;
      this.requestId = requestId;
    }
  }

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  function authHeaders() {
    const key = storedKey();
    return key ? { "X-API-Key": key } : {};
  }

  // The API's own words: {"detail": "..."} (or FastAPI's list of field errors), with the request id.
  async function apiError(response) {
    let detail = `${response.status} ${response.statusText}`.trim();
    let requestId = response.headers.get("X-Request-ID");
    try {
      const body = await response.json();
      if (typeof body.detail === "string") {
        detail = body.detail;
      } else if (Array.isArray(body.detail)) {
        detail = body.detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
      }
      requestId = body.request_id || requestId;
    } catch {
      // not JSON: keep the status line
    }
    return new ApiError(response.status, detail, requestId);
  }

  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    } catch (err) {
      throw new ApiError(0, `the service could not be reached (${err.message})`, null);
    }
    if (!response.ok) {
      throw await apiError(response);
    }
    return response;
  }

  function predict(file, model, format, extra = "") {
    const body = new FormData();
    body.append("file", file, file.name || "image");
    const query = `model=${encodeURIComponent(model)}&format=${format}${extra}`;
    return api(`/v1/predict?${query}`, { method: "POST", body });
  }

  // --- jobs -----------------------------------------------------------------------------------

  const JOB_POLL_MS = 1000;
  const isTiff = (file) => file.type === "image/tiff" || /\.(tiff?|svs|btf)$/i.test(file.name || "");
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function showJob(job) {
    const p = job.progress;
    const parts = [`Job ${job.id.slice(0, 8)}: ${job.state}`];
    if (p.stage && p.stage !== job.state) parts.push(p.stage);
    if (p.regions_total) parts.push(`${p.regions_done}/${p.regions_total} regions`);
    if (p.tiles_total) parts.push(`${p.tiles_done.toLocaleString("en-US")}/${p.tiles_total.toLocaleString("en-US")} tiles`);
    if (job.attempts > 1) parts.push(`resumed (start ${job.attempts})`);
    els.jobState.textContent = parts.join(" · ");
    els.jobProgress.value = p.fraction;
    els.job.dataset.state = job.state;
    els.job.hidden = false;
  }

  async function download(url, name) {
    try {
      const blob = await (await api(url)).blob();
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = name;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    } catch (err) {
      showError(err);
    }
  }

  function showJobResults(job) {
    const names = { tiff: "mask.tiff", instances: "instances.tiff", json: "json", csv: "instances.csv", geojson: "outlines.geojson", png: "png", overlay: "overlay.png" };
    els.jobResults.replaceChildren(
      ...Object.entries(job.results).map(([fmt, r]) => {
        const li = document.createElement("li");
        const b = document.createElement("button");
        b.type = "button";
        b.className = "button";
        b.dataset.format = fmt;
        b.textContent = `${names[fmt] || fmt} (${Math.max(1, Math.round(r.bytes / 1024)).toLocaleString("en-US")} KB)`;
        b.addEventListener("click", () => download(r.url, `${job.id}-${names[fmt] || fmt}`));
        li.append(b);
        return li;
      }),
    );
  }

  // POST the file to /v1/jobs and poll it until it ends; the finished job, or null when a newer run began.
  async function runJob(file, name, run) {
    const body = new FormData();
    body.append("file", file, file.name || "image");
    const format = isTiff(file) ? "auto" : "json";
    let job = await (await api(`/v1/jobs?model=${encodeURIComponent(name)}&format=${format}`, { method: "POST", body })).json();
    while (job.state === "queued" || job.state === "running") {
      showJob(job);
      setStatus(`Job ${job.state}…`, true);
      await sleep(JOB_POLL_MS);
      if (run !== state.run) return null;
      job = await (await api(`/v1/jobs/${job.id}`)).json();
    }
    showJob(job);
    if (job.state !== "done") throw new ApiError(0, `the job ${job.state}: ${job.error || "no reason given"}`, null);
    showJobResults(job);
    return job;
  }

  // --- status and errors ----------------------------------------------------------------------

  function setStatus(text, busy = false) {
    els.status.textContent = text;
    els.status.classList.toggle("busy", busy);
  }

  function showError(err) {
    const status = err instanceof ApiError ? err.status : 0;
    els.errorStatus.textContent = status ? `${status}` : "with an error";
    els.errorDetail.textContent = err.message;
    els.errorId.textContent = err.requestId ? `Request id: ${err.requestId}` : "";
    els.error.hidden = false;
    const needsKey = status === 401;
    els.keyForm.classList.toggle("needed", needsKey);
    if (needsKey) {
      els.key.focus();
    }
  }

  function clearError() {
    els.error.hidden = true;
    els.keyForm.classList.remove("needed");
  }

  // --- models ---------------------------------------------------------------------------------

  const rgb = (c) => `rgb(${c[0]}, ${c[1]}, ${c[2]})`;

  function formatMetric(value) {
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return value.toLocaleString("en-US");
    return Math.abs(value) <= 1 ? value.toFixed(3) : value.toFixed(2);
  }

  function swatch(color) {
    const s = document.createElement("span");
    s.className = "swatch";
    s.style.background = rgb(color);
    s.setAttribute("aria-hidden", "true");
    return s;
  }

  function showModel(name) {
    const m = state.models.get(name);
    if (!m) {
      els.modelCard.hidden = true;
      return;
    }
    els.modelDescription.textContent = m.description || m.name;
    const sizing = m.input.sizing === "tile" ? `tiles of ${m.input.size} px` : `resized to ${m.input.size} px`;
    const instances = m.instances ? ` · separates instances (${m.instances.method})` : "";
    els.modelMeta.textContent = `version ${m.version} · ${m.device}, ${m.precision} · ${sizing}${instances}`;
    els.modelClasses.replaceChildren(
      ...m.classes.map((c) => {
        const li = document.createElement("li");
        li.append(swatch(c.color), document.createTextNode(c.name));
        return li;
      }),
    );
    const metrics = Object.entries(m.metrics || {});
    els.modelMetrics.replaceChildren(
      ...metrics.flatMap(([k, v]) => {
        const dt = document.createElement("dt");
        dt.textContent = k.replaceAll("_", " ");
        const dd = document.createElement("dd");
        dd.textContent = formatMetric(v);
        return [dt, dd];
      }),
    );
    els.modelMetrics.previousElementSibling.hidden = metrics.length === 0;
    els.modelCard.hidden = false;
  }

  async function loadModels() {
    setStatus("Loading models…", true);
    let body;
    try {
      body = await (await api("/v1/models")).json();
    } catch (err) {
      if (err instanceof ApiError && err.status === 503) {
        setStatus("The models are still loading…", true);
        setTimeout(loadModels, 1500);
        return;
      }
      setStatus("");
      showError(err);
      return;
    }
    clearError();
    state.models = new Map(body.models.map((m) => [m.name, m]));
    const previous = els.model.value;
    els.model.replaceChildren(
      ...body.models.map((m) => {
        const o = document.createElement("option");
        o.value = m.name;
        o.textContent = m.default ? `${m.name} (default)` : m.name;
        return o;
      }),
    );
    els.model.value = state.models.has(previous) ? previous : body.default_model;
    els.model.disabled = false;
    showModel(els.model.value);
    setStatus(state.file ? "" : "Ready. Choose an image.");
    if (state.file) segment();
  }

  // --- drawing --------------------------------------------------------------------------------

  // The image as the browser decodes it (EXIF orientation applied, as the service does). Formats the
  // browser cannot show (TIFF) come back from the service itself: an overlay at opacity 0 is the image.
  async function loadBitmap(file, model) {
    try {
      return await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch {
      const response = await predict(file, model, "overlay", "&alpha=0");
      return createImageBitmap(await response.blob());
    }
  }

  // Class ids from the JSON's COCO RLE (column-major runs, zeros first), painted in the class colors;
  // the background (class 0) stays transparent.
  function paintMask(pred, model) {
    const { width: w, height: h } = pred;
    const canvas = els.maskLayer;
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(w, h);
    const data = image.data;
    const colors = new Map(model.classes.map((c) => [c.id, c.color]));
    for (const cls of pred.classes) {
      if (cls.id === 0 || cls.pixels === 0) continue;
      const [r, g, b] = colors.get(cls.id) || [255, 0, 255];
      forEachRlePixel(cls.rle.counts, w, h, (p) => {
        const o = p * 4;
        data[o] = r;
        data[o + 1] = g;
        data[o + 2] = b;
        data[o + 3] = 255;
      });
    }
    ctx.putImageData(image, 0, 0);
  }

  // Calls fn(p) for every pixel of a COCO RLE of a w x h image (column-major runs, starting with a run of
  // zeros), p being the pixel's row-major index.
  function forEachRlePixel(counts, w, h, fn) {
    let pos = 0;
    for (let i = 0; i < counts.length; i++) {
      const n = counts[i];
      if (i % 2 === 1) {
        for (let k = pos; k < pos + n; k++) {
          const x = Math.floor(k / h);
          fn((k - x * h) * w + x);
        }
      }
      pos += n;
    }
  }

  // Instance outlines: foreground pixels next to a pixel of another instance (or the background) are
  // drawn white, so touching instances show apart. Only pixels paintMask painted are recoloured.
  function paintOutlines(pred) {
    const { width: w, height: h } = pred;
    const ids = new Int32Array(w * h); // row-major instance ids, 0 = background
    for (const inst of pred.instances) {
      forEachRlePixel(inst.rle.counts, w, h, (p) => {
        ids[p] = inst.id;
      });
    }
    const ctx = els.maskLayer.getContext("2d");
    const image = ctx.getImageData(0, 0, w, h);
    const data = image.data;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const p = y * w + x;
        const id = ids[p];
        if (id === 0 || data[p * 4 + 3] === 0) continue;
        const edge =
          (x > 0 && ids[p - 1] !== id) ||
          (x < w - 1 && ids[p + 1] !== id) ||
          (y > 0 && ids[p - w] !== id) ||
          (y < h - 1 && ids[p + w] !== id);
        if (edge) data.fill(255, p * 4, p * 4 + 4);
      }
    }
    ctx.putImageData(image, 0, 0);
  }

  function paintImage(bitmap, width, height) {
    const canvas = els.imageLayer;
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").drawImage(bitmap, 0, 0, width, height);
  }

  function applyOpacity() {
    const v = Number(els.opacity.value);
    els.opacityValue.textContent = `${v}%`;
    els.maskLayer.style.opacity = String(v / 100);
  }

  // --- results --------------------------------------------------------------------------------

  const ms = (v) => `${v < 10 ? v.toFixed(1) : Math.round(v).toLocaleString("en-US")} ms`;

  function showAreas(pred, model) {
    const colors = new Map(model.classes.map((c) => [c.id, c.color]));
    els.areas.replaceChildren(
      ...pred.classes.map((c) => {
        const tr = document.createElement("tr");
        tr.dataset.classId = String(c.id);
        tr.dataset.pixels = String(c.pixels);
        const name = document.createElement("td");
        const label = document.createElement("div");
        label.className = "class-cell";
        label.append(swatch(colors.get(c.id) || [0, 0, 0]), document.createTextNode(c.name));
        const bar = document.createElement("span");
        bar.className = "bar";
        const fill = document.createElement("span");
        fill.style.width = `${(c.fraction * 100).toFixed(2)}%`;
        fill.style.background = c.id === 0 ? "" : rgb(colors.get(c.id) || [0, 0, 0]);
        bar.append(fill);
        name.append(label, bar);
        const pixels = document.createElement("td");
        pixels.className = "num pixels";
        pixels.textContent = c.pixels.toLocaleString("en-US");
        const share = document.createElement("td");
        share.className = "num share";
        share.textContent = `${(c.fraction * 100).toFixed(2)}%`;
        tr.append(name, pixels, share);
        return tr;
      }),
    );
  }

  function showTiming(timings, roundtripMs) {
    const total = Object.values(timings).reduce((a, b) => a + b, 0);
    els.timingTotal.textContent = ms(total);
    els.timingSplit.replaceChildren(
      ...Object.entries(timings).flatMap(([k, v]) => {
        const dt = document.createElement("dt");
        dt.textContent = k;
        const dd = document.createElement("dd");
        dd.textContent = ms(v);
        return [dt, dd];
      }),
    );
    els.roundtrip.textContent = `Round trip from this page: ${ms(roundtripMs)}.`;
  }

  function resetResult() {
    if (state.maskUrl) URL.revokeObjectURL(state.maskUrl);
    state.maskUrl = null;
    els.download.disabled = true;
    els.areas.replaceChildren();
    els.instanceCount.hidden = true;
    els.instanceCount.textContent = "";
    els.timingTotal.textContent = "–";
    els.timingSplit.replaceChildren();
    els.roundtrip.textContent = "";
    els.job.hidden = true;
    els.jobResults.replaceChildren();
  }

  // After an error nothing of the previous result stays on screen: its image and mask would pass for
  // this file's.
  function clearViewer() {
    for (const canvas of [els.imageLayer, els.maskLayer]) {
      canvas.width = 0;
      canvas.height = 0;
    }
    els.caption.textContent = "";
    els.imageLayer.removeAttribute("role");
    els.imageLayer.removeAttribute("aria-label");
  }

  // 5 bytes is "5 bytes", not "1 KB".
  function formatBytes(n) {
    if (n < 1024) return `${n} ${n === 1 ? "byte" : "bytes"}`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(n < 10 * 1024 ? 1 : 0)} KB`;
    return `${(n / (1024 * 1024)).toFixed(n < 10 * 1024 * 1024 ? 1 : 0)} MB`;
  }

  async function segment() {
    const file = state.file;
    const name = els.model.value;
    const model = state.models.get(name);
    if (!file || !model) return;
    const run = ++state.run;
    clearError();
    resetResult();
    els.viewer.dataset.state = "loading";
    els.viewer.setAttribute("aria-busy", "true");
    setStatus(`Segmenting with ${name}…`, true);
    const t0 = performance.now();
    try {
      let job = null;
      if (els.asJob.checked) {
        job = await runJob(file, name, run);
        if (!job || run !== state.run) return;
        if (job.kind === "slide") {
          const areas = await (await api(job.results.json.url)).json();
          showAreas(areas, model);
          if (areas.count !== undefined) {
            els.instanceCount.textContent = `${areas.count.toLocaleString("en-US")} ${areas.count === 1 ? "instance" : "instances"}`;
            els.instanceCount.dataset.count = String(areas.count);
            els.instanceCount.hidden = false;
          }
          els.caption.textContent = `${file.name || "slide"} · ${areas.width}×${areas.height} (level ${areas.level}) · ${name}`;
          els.viewer.dataset.state = "empty";
          setStatus(`Slide done in ${ms(performance.now() - t0)}: its results are above.`);
          return;
        }
      }
      let pred;
      let maskBlob = null;
      if (job) {
        pred = await (await api(job.results.json.url)).json();
      } else {
        const [jsonResponse, pngResponse] = await Promise.all([
          predict(file, name, "json"),
          predict(file, name, "png"),
        ]);
        pred = await jsonResponse.json();
        maskBlob = await pngResponse.blob();
      }
      const roundtrip = performance.now() - t0;
      const bitmap = await loadBitmap(file, name);
      if (run !== state.run) return;
      paintImage(bitmap, pred.width, pred.height);
      paintMask(pred, model);
      if (pred.instances) {
        paintOutlines(pred);
        els.instanceCount.textContent = `${pred.count.toLocaleString("en-US")} ${pred.count === 1 ? "instance" : "instances"}`;
        els.instanceCount.dataset.count = String(pred.count);
        els.instanceCount.hidden = false;
      }
      applyOpacity();
      showAreas(pred, model);
      if (maskBlob) {
        showTiming(pred.timings_ms, roundtrip);
        state.maskUrl = URL.createObjectURL(maskBlob);
        state.maskName = `${(file.name || "image").replace(/\.[^.]*$/, "")}-${name}-mask.png`;
        els.download.disabled = false;
      }
      const found = pred.classes
        .filter((c) => c.id !== 0)
        .map((c) => `${c.name} ${(c.fraction * 100).toFixed(1)}%`)
        .join(", ");
      els.caption.textContent = `${file.name || "image"} · ${pred.width}×${pred.height} · ${name} ${pred.version}`;
      els.imageLayer.setAttribute("role", "img");
      els.imageLayer.setAttribute("aria-label", `${file.name || "The image"} with the ${name} mask over it: ${found}`);
      els.viewer.dataset.state = "done";
      setStatus(`Done in ${ms(roundtrip)}.`);
    } catch (err) {
      if (run !== state.run) return;
      resetResult();
      clearViewer();
      els.viewer.dataset.state = "error";
      setStatus("");
      showError(err);
    } finally {
      if (run === state.run) els.viewer.removeAttribute("aria-busy");
    }
  }

  function chooseFile(file) {
    if (!file) return;
    state.file = file;
    els.fileName.textContent = `${file.name || "pasted image"} · ${formatBytes(file.size)}`;
    els.fileName.hidden = false;
    segment();
  }

  // --- wiring ---------------------------------------------------------------------------------

  els.model.addEventListener("change", () => {
    showModel(els.model.value);
    segment();
  });
  els.file.addEventListener("change", () => chooseFile(els.file.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    els.drop.addEventListener(type, (e) => {
      e.preventDefault();
      els.drop.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    els.drop.addEventListener(type, () => els.drop.classList.remove("dragging"));
  }
  els.drop.addEventListener("drop", (e) => {
    e.preventDefault();
    chooseFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (item) chooseFile(item);
  });
  els.opacity.addEventListener("input", applyOpacity);
  els.download.addEventListener("click", () => {
    if (!state.maskUrl) return;
    const a = document.createElement("a");
    a.href = state.maskUrl;
    a.download = state.maskName;
    document.body.append(a);
    a.click();
    a.remove();
  });
  els.keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    try {
      const key = els.key.value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      // storage unavailable: the key is not kept
    }
    setStatus("API key saved for this tab.");
    loadModels();
  });
  els.keyClear.addEventListener("click", () => {
    els.key.value = "";
    try {
      sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      // nothing stored
    }
    setStatus("API key cleared.");
  });

  els.key.value = storedKey();
  applyOpacity();
  loadModels();
})();
