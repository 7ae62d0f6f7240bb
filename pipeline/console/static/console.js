// dropgate console: the two things that need JavaScript. Everything else works without it.
"use strict";

// 1. Live refresh: a page's #live region is fetched again every data-refresh seconds and swapped in.
//    These requests say so (X-Dropgate-Refresh), so they do not keep an idle session alive.
function liveRefresh() {
  const live = document.getElementById("live");
  if (!live || !live.dataset.refresh) return;
  const seconds = Math.max(1, Number(live.dataset.refresh));
  let busy = false;
  setInterval(async () => {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const response = await fetch(window.location.href, {
        headers: { "X-Dropgate-Refresh": "1" },
        credentials: "same-origin",
        redirect: "error",
      });
      if (response.status === 401) {
        window.location.reload(); // signed out or expired: the server sends the sign-in page
        return;
      }
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById("live");
      if (fresh) {
        const open = new Set([...live.querySelectorAll("details[open]")].map((d) => d.id));
        live.replaceChildren(...fresh.childNodes);
        open.forEach((id) => { const d = document.getElementById(id); if (d) d.open = true; });
      }
    } catch (error) {
      // the daemon restarting or the network: try again at the next tick
    } finally {
      busy = false;
    }
  }, seconds * 1000);
}

// 2. Import with a progress bar: the same form, sent by XMLHttpRequest to watch the upload.
function importProgress() {
  const form = document.getElementById("import-form");
  if (!form) return;
  const box = form.querySelector(".upload-progress");
  const bar = box.querySelector("progress");
  const text = box.querySelector(".upload-text");
  const failure = form.querySelector(".upload-error");
  const fail = (message) => {
    failure.textContent = message;
    failure.hidden = false;
    form.querySelector("button").disabled = false;
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const file = form.querySelector("input[type=file]").files[0];
    if (!file) return;
    failure.hidden = true;
    if (file.size > Number(form.dataset.max)) {
      fail(`${file.name} is larger than the limit (limits.max_archive_bytes)`);
      return;
    }
    const request = new XMLHttpRequest();
    request.open("POST", form.action);
    request.setRequestHeader("X-Requested-With", "dropgate-console");
    request.upload.addEventListener("progress", (progress) => {
      if (!progress.lengthComputable) return;
      bar.max = progress.total;
      bar.value = progress.loaded;
      text.textContent = `${Math.floor((100 * progress.loaded) / progress.total)} % of ${file.name}`;
    });
    request.addEventListener("load", () => {
      let answer = null;
      try { answer = JSON.parse(request.responseText); } catch (error) { answer = null; }
      if (answer && answer.ok) {
        window.location.assign(answer.location);
      } else if (request.status === 401 || request.status === 303) {
        window.location.reload();
      } else {
        fail(answer ? answer.message : `the upload was refused (HTTP ${request.status})`);
      }
    });
    request.addEventListener("error", () => fail("the upload was interrupted; nothing was kept, try again"));
    box.hidden = false;
    form.querySelector("button").disabled = true;
    text.textContent = `0 % of ${file.name}`;
    request.send(new FormData(form));
  });
}

document.addEventListener("DOMContentLoaded", () => {
  liveRefresh();
  importProgress();
});
