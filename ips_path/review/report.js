// ipspath review report: sorting, filtering and the full-size viewer. Plain JS, no libraries.
// The page is complete without it; the controls stay hidden until this runs.
// The current view is kept in the address (#sort=wrong&pred=tumor...), so a bookmark reopens it.
(function () {
  "use strict";

  const grid = document.getElementById("cards");
  const form = document.getElementById("controls");
  const shownCount = document.getElementById("shown-count");
  const noMatch = document.getElementById("no-match");
  const cards = Array.from(grid.querySelectorAll("article.card"));
  const OUTCOME_RANK = { wrong: 0, unlabelled: 1, valued: 1, correct: 2 };

  function number(card, key) {
    const value = parseFloat(card.dataset[key]);
    return Number.isNaN(value) ? -Infinity : value;
  }

  function byHighest(key) {
    return (a, b) => {
      const x = number(a, key);
      const y = number(b, key);
      return x === y ? 0 : x > y ? -1 : 1;
    };
  }

  function comparator(sortKey) {
    if (sortKey === "id") {
      return (a, b) => a.dataset.id.localeCompare(b.dataset.id, undefined, { numeric: true });
    }
    if (sortKey === "wrong") {
      // confidently wrong slides first: those a reviewer should look at
      const confidence = byHighest("conf");
      return (a, b) => OUTCOME_RANK[a.dataset.outcome] - OUTCOME_RANK[b.dataset.outcome] || confidence(a, b);
    }
    return byHighest(sortKey); // "conf" or "p<class index>"
  }

  function state() {
    return {
      sort: form.elements.sort.value,
      rev: form.elements.rev.checked,
      pred: form.elements.pred.value,
      label: form.elements.label.value,
      outcome: form.elements.outcome.value,
      q: form.elements.q.value.trim().toLowerCase(),
    };
  }

  function matches(card, s) {
    return (!s.pred || card.dataset.pred === s.pred)
      && (!s.label || card.dataset.label === s.label)
      && (!s.outcome || card.dataset.outcome === s.outcome)
      && (!s.q || card.dataset.id.toLowerCase().includes(s.q));
  }

  function apply() {
    const s = state();
    const compare = comparator(s.sort);
    const sign = s.rev ? -1 : 1;
    const sorted = cards.slice().sort((a, b) => sign * compare(a, b) || a.dataset.order - b.dataset.order);
    let shown = 0;
    for (const card of sorted) {
      card.hidden = !matches(card, s);
      shown += card.hidden ? 0 : 1;
      grid.appendChild(card);
    }
    shownCount.textContent = `Showing ${shown} of ${cards.length} slide${cards.length === 1 ? "" : "s"}`;
    noMatch.hidden = shown > 0 || cards.length === 0;
    saveView();
  }

  function saveView() {
    const params = new URLSearchParams();
    for (const el of form.elements) {
      const value = el.type === "checkbox" ? (el.checked ? "1" : "") : el.value;
      if (el.name && value && !(el.name === "sort" && value === el.options[0].value)) {
        params.set(el.name, value);
      }
    }
    try {
      history.replaceState(null, "", "#" + params.toString());
    } catch (err) {
      // some browsers refuse history changes on file:// pages; the view just is not remembered
    }
  }

  function restoreView() {
    const params = new URLSearchParams(location.hash.slice(1));
    for (const el of form.elements) {
      if (!el.name || !params.has(el.name)) continue;
      const value = params.get(el.name);
      if (el.type === "checkbox") {
        el.checked = value === "1";
      } else if (el.tagName !== "SELECT" || Array.from(el.options).some((o) => o.value === value)) {
        el.value = value;
      }
    }
  }

  form.addEventListener("input", apply);
  form.addEventListener("change", apply);
  form.addEventListener("submit", (event) => event.preventDefault());
  restoreView();
  form.hidden = false;
  apply();

  // served by `ipspath view` (which marks the page): each card links to the slide's deep-zoom viewer
  const viewerMark = document.querySelector('meta[name="ipspath-viewer"]');
  if (viewerMark) {
    for (const card of cards) {
      const link = document.createElement("a");
      link.className = "viewer-link";
      link.href = viewerMark.content + encodeURIComponent(card.dataset.id);
      link.textContent = "open in viewer";
      card.querySelector(".card-head").append(link);
    }
  }

  // full-size viewer
  const box = document.createElement("div");
  box.className = "lightbox";
  box.hidden = true;
  const big = document.createElement("img");
  box.appendChild(big);
  document.body.appendChild(box);

  function closeViewer() {
    box.hidden = true;
    big.removeAttribute("src");
  }

  document.addEventListener("click", (event) => {
    const link = event.target.closest("a.zoom");
    // a modified click keeps its usual meaning (new tab, new window)
    if (!link || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    const thumb = link.querySelector("img");
    big.alt = thumb ? thumb.alt : "";
    big.src = link.href;
    box.hidden = false;
    box.scrollTo(0, 0);
  });
  box.addEventListener("click", closeViewer);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !box.hidden) closeViewer();
  });
})();
