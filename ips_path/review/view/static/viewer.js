// ipspath view: one slide at full resolution with its attention, in OpenSeadragon.
// Layers: the slide (JPEG tiles), the attention (PNG tiles, transparent outside the patches; the
// browser sets their opacity), and a canvas on top for the tissue contour, the patch grid and the
// patch under the pointer. Everything comes from this server; nothing is fetched elsewhere.
// The address may carry #opacity=0-100&top=RANK (zoom to the patch of that rank).
// A multi-task run gets a task chooser in the header: it switches the attention layer, the
// top-k list and the hover values to that task's query token (default: the mean over tasks).
// The colour chooser switches the attention layer between ranks within the slide (attention[-N])
// and attention weights on the scale shared by every slide (weight[-N]); the colour bar names the
// scale shown and the spread of the attention (#scale=weight in the address starts there).
// For tests and scripts, <body> gets data-* fields: ready, slide-tiles, attention-tiles,
// failed-tiles, zoomed-rank, task (the attention layer shown) and scale; window.ipspathViewer is the
// OpenSeadragon viewer.
(function () {
  "use strict";

  const body = document.body;
  const slideId = body.dataset.slideId;
  const hash = new URLSearchParams(location.hash.slice(1));
  const $ = (id) => document.getElementById(id);

  function fail(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  fetch("/api/slide/" + encodeURIComponent(slideId))
    .then((response) => {
      if (!response.ok) {
        return response.text().then((text) => { throw new Error(text); });
      }
      return response.json();
    })
    .then(start)
    .catch((error) => fail("Cannot show this slide: " + error.message));

  function viewLink(id) {
    return "/view/" + encodeURIComponent(id);
  }

  function percent(p) {
    return p === null ? "\u2013" : (100 * p).toFixed(1) + " %";
  }

  function header(info) {
    $("slide-title").textContent = info.slide_id;
    $("position").textContent = info.position + " / " + info.n_slides;
    for (const [key, id] of [["previous", info.previous], ["next", info.next]]) {
      if (id !== null) {
        $(key).href = viewLink(id);
        $(key).hidden = false;
      }
    }
    const pred = info.prediction;
    const box = $("prediction");
    const outcome = document.createElement("span");
    outcome.className = "badge badge-" + pred.outcome;
    outcome.textContent = { correct: "correct", wrong: "wrong", unlabelled: "no label", valued: "true value" }[pred.outcome];
    const facts = document.createElement("span");
    facts.textContent = "predicted " + pred.predicted + " \u00b7 true label " + (pred.label || "unknown");
    box.append(outcome, facts);
    pred.classes.forEach((name, i) => {
      const p = pred.probabilities[i];
      const item = document.createElement("span");
      item.className = "prob" + (name === pred.predicted ? " predicted" : "");
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = (p === null ? 0 : 100 * p) + "%";
      bar.append(fill);
      item.append(name + " ", bar, " " + percent(p));
      box.append(item);
    });
    $("colour-bar").querySelector(".bar").style.background =
      "linear-gradient(to right, " + info.colour_stops.map((c) => "rgb(" + c.join(",") + ")").join(", ") + ")";
  }

  // Patches: coordinates, a lookup from grid cell to patch, and their order by attention.
  function patchIndex(info) {
    const p = info.patches;
    const n = p.coords.length / 2;
    let ox = Infinity, oy = Infinity, maxX = -Infinity;
    for (let i = 0; i < n; i++) {
      ox = Math.min(ox, p.coords[2 * i]);
      oy = Math.min(oy, p.coords[2 * i + 1]);
      maxX = Math.max(maxX, p.coords[2 * i]);
    }
    const cols = Math.floor((maxX - ox) / p.stride) + 1;
    const cell = new Map();
    for (let i = 0; i < n; i++) {
      cell.set(Math.floor((p.coords[2 * i + 1] - oy) / p.stride) * cols + Math.floor((p.coords[2 * i] - ox) / p.stride), i);
    }
    return {
      n, size: p.size, stride: p.stride, coords: p.coords,
      use(scores) { // rank the patches by these scores (one task's, or the mean)
        this.scores = scores;
        this.order = Array.from(scores.keys()).sort((a, b) => scores[b] - scores[a] || a - b);
        this.rank = new Int32Array(n);
        this.order.forEach((index, position) => { this.rank[index] = position + 1; });
      },
      at(x, y) { // the patch whose grid cell holds (x, y) and which covers it, or -1
        const col = Math.floor((x - ox) / p.stride);
        const row = Math.floor((y - oy) / p.stride);
        const i = cell.get(row * cols + col);
        if (i === undefined || col < 0 || col >= cols) return -1;
        const px = p.coords[2 * i], py = p.coords[2 * i + 1];
        return x >= px && x < px + p.size && y >= py && y < py + p.size ? i : -1;
      },
    };
  }

  function start(info) {
    header(info);
    const patches = patchIndex(info);
    patches.use(info.patches.scores);
    let scale = hash.get("scale") === "weight" ? "weight" : "attention"; // the layer's scale prefix
    let task = ""; // "" (the mean over tasks) or "-N"
    let layer = scale + task;
    const base = "/tiles/" + encodeURIComponent(info.slide_id) + "/" + info.version + "/";
    let opacity = hash.has("opacity") ? Math.min(Math.max(parseFloat(hash.get("opacity")) || 0, 0), 100) : 50;
    let hovered = -1, selected = -1;
    const counts = { slide: 0, attention: 0, failed: 0 };

    function source(layer, extension) {
      return {
        width: info.width, height: info.height, tileSize: info.tile_size, tileOverlap: 0,
        minLevel: 0, maxLevel: info.max_level,
        getTileUrl: (level, x, y) => base + layer + "/" + level + "/" + x + "_" + y + extension,
      };
    }

    const viewer = OpenSeadragon({
      element: $("viewer"),
      prefixUrl: "/static/openseadragon/images/",
      drawer: "canvas",
      tileSources: source("slide", ".jpeg"),
      showNavigator: true,
      navigatorPosition: "BOTTOM_LEFT",
      showRotationControl: false,
      maxZoomPixelRatio: 4,
      visibilityRatio: 0.5,
      immediateRender: false,
      crossOriginPolicy: false,
      gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
    });

    window.ipspathViewer = viewer;
    $("opacity").value = String(opacity);

    function overlayItem() {
      return viewer.world.getItemCount() > 1 ? viewer.world.getItemAt(1) : null;
    }

    function addOverlay() {
      // preload: tiles load at opacity 0 too, so the slider shows them at once
      const shown = $("show-overlay").checked ? opacity / 100 : 0;
      layer = scale + task;
      viewer.addTiledImage({ tileSource: source(layer, ".png"), index: 1, opacity: shown, preload: true });
      body.dataset.task = layer;
      body.dataset.scale = scale;
      legend();
    }

    function legend() { // what the colours show, and how spread this attention is
      const shown = info.scales[scale === "weight" ? "weight" : "rank"];
      $("bar-low").textContent = shown.low;
      $("bar-mid").textContent = shown.mid;
      $("bar-high").textContent = shown.high;
      $("bar-caption").textContent = shown.title;
      const chosen = info.tasks.find((t) => t.layer === "attention" + task);
      const spread = chosen ? chosen.spread : info.spread;
      $("spread").textContent = spread.text;
      $("spread").classList.toggle("flat", spread.flat);
    }

    function replaceOverlay() {
      const old = overlayItem();
      if (old) viewer.world.removeItem(old);
      addOverlay();
    }

    $("scale").value = scale;
    legend();
    $("scale").addEventListener("change", (event) => {
      scale = event.target.value === "weight" ? "weight" : "attention";
      replaceOverlay();
    });

    if (info.tasks.length > 1) {
      const select = $("task");
      select.append(new Option("all tasks (mean)", "attention"));
      for (const t of info.tasks) select.append(new Option(t.name, t.layer));
      $("task-chooser").hidden = false;
      select.addEventListener("change", () => {
        task = select.value.replace(/^attention/, "");
        const chosen = info.tasks.find((t) => t.layer === select.value);
        patches.use(chosen ? chosen.scores : info.patches.scores);
        replaceOverlay();
        fillTopList();
        showPatch(hovered >= 0 ? hovered : selected);
        draw();
      });
    }

    viewer.addHandler("open", () => {
      addOverlay();
      const top = parseInt(hash.get("top") || "0", 10);
      if (top >= 1 && top <= patches.n) {
        zoomTo(patches.order[top - 1], true);
        body.dataset.zoomedRank = String(top);
      }
      body.dataset.ready = "1";
    });
    viewer.addHandler("tile-loaded", (event) => {
      const layer = event.tiledImage === viewer.world.getItemAt(0) ? "slide" : "attention";
      counts[layer] += 1;
      body.dataset[layer === "slide" ? "slideTiles" : "attentionTiles"] = String(counts[layer]);
    });
    viewer.addHandler("tile-load-failed", () => {
      counts.failed += 1;
      body.dataset.failedTiles = String(counts.failed);
    });

    $("show-overlay").addEventListener("change", (event) => {
      const item = overlayItem();
      if (item) item.setOpacity(event.target.checked ? opacity / 100 : 0);
    });
    $("opacity").addEventListener("input", (event) => {
      opacity = Number(event.target.value);
      $("show-overlay").checked = true;
      const item = overlayItem();
      if (item) item.setOpacity(opacity / 100);
    });
    $("show-contour").addEventListener("change", draw);
    $("show-grid").addEventListener("change", draw);

    // -- the vector layer ----------------------------------------------------------------------
    const canvas = document.createElement("canvas");
    canvas.id = "overlay-canvas";
    viewer.canvas.appendChild(canvas);
    const context = canvas.getContext("2d");

    function transform() { // image px -> viewer px: x * scale + dx (no rotation)
      const item = viewer.world.getItemAt(0);
      const a = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
      const b = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(info.width, info.height));
      return { scale: (b.x - a.x) / info.width, dx: a.x, dy: a.y };
    }

    function patchBox(index, t) {
      const x = patches.coords[2 * index], y = patches.coords[2 * index + 1];
      return [x * t.scale + t.dx, y * t.scale + t.dy, (x + patches.size) * t.scale + t.dx,
        (y + patches.size) * t.scale + t.dy];
    }

    function draw() {
      if (viewer.world.getItemCount() === 0) return;
      const ratio = window.devicePixelRatio || 1;
      const width = viewer.canvas.clientWidth, height = viewer.canvas.clientHeight;
      if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
        canvas.width = Math.round(width * ratio);
        canvas.height = Math.round(height * ratio);
        canvas.style.width = width + "px";
        canvas.style.height = height + "px";
      }
      context.setTransform(ratio, 0, 0, ratio, 0, 0);
      context.clearRect(0, 0, width, height);
      const t = transform();
      if ($("show-contour").checked) {
        context.strokeStyle = "#1b6ef3";
        context.lineWidth = 1.5;
        context.beginPath();
        for (const line of info.contours) {
          for (let i = 0; i < line.length; i += 2) {
            const x = line[i] * t.scale + t.dx, y = line[i + 1] * t.scale + t.dy;
            if (i === 0) context.moveTo(x, y); else context.lineTo(x, y);
          }
        }
        context.stroke();
      }
      const side = patches.size * t.scale;
      if ($("show-grid").checked && side >= 3) {
        context.strokeStyle = "rgba(0, 0, 0, 0.35)";
        context.lineWidth = 1;
        context.beginPath();
        for (let i = 0; i < patches.n; i++) {
          const [x0, y0, x1, y1] = patchBox(i, t);
          if (x1 < 0 || y1 < 0 || x0 > width || y0 > height) continue;
          context.rect(x0, y0, x1 - x0, y1 - y0);
        }
        context.stroke();
      }
      for (const [index, colour] of [[hovered, "rgba(255,255,255,0.9)"], [selected, "#ff2d55"]]) {
        if (index < 0) continue;
        const [x0, y0, x1, y1] = patchBox(index, t);
        context.strokeStyle = colour;
        context.lineWidth = 2;
        context.strokeRect(x0, y0, x1 - x0, y1 - y0);
      }
    }
    viewer.addHandler("update-viewport", draw);
    viewer.addHandler("resize", draw);

    // -- patches: hover, click, top list -------------------------------------------------------
    function patchAt(position) {
      const t = transform();
      return patches.at((position.x - t.dx) / t.scale, (position.y - t.dy) / t.scale);
    }

    function showPatch(index) {
      const box = $("patch-info");
      if (index < 0) {
        box.className = "muted";
        box.textContent = "hover or click a patch";
        return;
      }
      const { rank } = patches;
      const x = patches.coords[2 * index], y = patches.coords[2 * index + 1];
      box.className = "";
      box.innerHTML = "";
      const rows = [["rank", rank[index] + " of " + patches.n],
        ["attention logit", patches.scores[index].toPrecision(4)],
        ["percentile", (patches.n > 1 ? 100 * (patches.n - rank[index]) / (patches.n - 1) : 100).toFixed(1)],
        ["level-0 x, y", x + ", " + y]];
      for (const [name, value] of rows) {
        const line = document.createElement("div");
        const strong = document.createElement("b");
        strong.textContent = value;
        line.append(name + ": ", strong);
        box.append(line);
      }
    }

    new OpenSeadragon.MouseTracker({
      element: viewer.canvas,
      moveHandler: (event) => {
        const index = patchAt(event.position);
        if (index !== hovered) {
          hovered = index;
          showPatch(hovered >= 0 ? hovered : selected);
          draw();
        }
      },
      leaveHandler: () => {
        hovered = -1;
        showPatch(selected);
        draw();
      },
    });
    viewer.addHandler("canvas-click", (event) => {
      if (!event.quick) return;
      selected = patchAt(event.position);
      showPatch(selected);
      markSelected();
      draw();
    });

    function zoomTo(index, immediately) {
      const x = patches.coords[2 * index], y = patches.coords[2 * index + 1];
      const pad = patches.size * 1.5;
      const rect = viewer.world.getItemAt(0).imageToViewportRectangle(x - pad, y - pad, patches.size + 2 * pad,
        patches.size + 2 * pad);
      viewer.viewport.fitBounds(rect, immediately);
      selected = index;
      showPatch(index);
      markSelected();
    }

    function markSelected() {
      for (const item of $("top-list").children) {
        item.classList.toggle("selected", Number(item.dataset.index) === selected);
      }
    }

    function fillTopList() {
      const list = $("top-list");
      list.innerHTML = "";
      patches.order.slice(0, info.top_k).forEach((index, position) => {
        const item = document.createElement("li");
        item.dataset.index = String(index);
        const rank = document.createElement("span");
        rank.className = "rank";
        rank.textContent = "#" + (position + 1);
        const score = document.createElement("span");
        score.textContent = patches.scores[index].toPrecision(4);
        item.append(rank, score);
        item.title = "zoom to this patch";
        item.addEventListener("click", () => zoomTo(index, false));
        list.append(item);
      });
      markSelected();
    }
    fillTopList();
  }
})();
