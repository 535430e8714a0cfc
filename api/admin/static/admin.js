// gpujobs admin: live refresh without a library. Every few seconds the page is fetched again and
// the element marked data-live is swapped for the fresh one (forms being typed into are left alone);
// a running job's page also follows the job's event stream for its progress.
(function () {
  "use strict";
  // Selects marked data-autosubmit (time windows) apply at once; their Show button stays for no-JS use.
  // (Delegated, so it survives the live swaps below.)
  document.addEventListener("change", function (event) {
    var target = event.target;
    if (target.matches && target.matches("select[data-autosubmit]") && target.form) { target.form.submit(); }
  });

  // Forms marked data-confirm (cancel, revoke) ask first.
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute && event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) { event.preventDefault(); }
  });

  var region = document.querySelector("[data-live]");
  var toggle = document.getElementById("live-toggle");
  if (!region || !toggle || region.hasAttribute("data-final")) { return; }
  var seconds = parseInt(region.getAttribute("data-live"), 10) || 5;
  var stored = window.localStorage && localStorage.getItem("gpujobs-live");
  toggle.checked = stored !== "off";
  toggle.addEventListener("change", function () {
    if (window.localStorage) { localStorage.setItem("gpujobs-live", toggle.checked ? "on" : "off"); }
  });

  function busy() {
    var active = document.activeElement;
    return active && region.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
  }

  function refresh() {
    if (!toggle.checked || document.hidden || busy()) { return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.redirected || response.status === 401 || response.status === 403) {
          window.location.reload();  // the session ended: show the login page
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (!html || busy()) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("[data-live]");
        if (fresh) {
          region.innerHTML = fresh.innerHTML;
          if (fresh.hasAttribute("data-final")) { window.clearInterval(timer); }
          var stamp = document.getElementById("live-stamp");
          if (stamp) { stamp.textContent = "updated " + new Date().toLocaleTimeString(); }
        }
      })
      .catch(function () { /* the server may be restarting: try again on the next tick */ });
  }

  var timer = window.setInterval(refresh, seconds * 1000);

  // A running job's page follows its event stream (GET /admin/jobs/<id>/events): each `progress` event
  // redraws the progress at once; a timeline event (claimed, stored, succeeded…) refreshes the page.
  var progress = document.querySelector("[data-events]");
  if (!progress || !window.EventSource) { return; }
  var stream = new EventSource(progress.getAttribute("data-events"));
  stream.addEventListener("progress", function (event) {
    var shown = document.getElementById("progress");
    var now = JSON.parse(event.data).progress || {};
    if (!shown || !toggle.checked) { return; }
    shown.textContent = "";
    if (now.total) {
      var bar = document.createElement("progress");
      bar.max = now.total;
      bar.value = now.step || 0;
      shown.appendChild(bar);
      shown.appendChild(document.createTextNode(" " + (now.step || 0) + " / " + now.total));
    } else {
      shown.appendChild(document.createTextNode(String(now.step || 0)));
    }
    if (now.message) { shown.appendChild(document.createTextNode(" · " + now.message)); }
  });
  ["claimed", "milestone", "stored", "succeeded", "failed", "canceled", "cancel_requested", "requeued"].forEach(
    function (name) { stream.addEventListener(name, refresh); });
  stream.addEventListener("job", function () { stream.close(); refresh(); });
})();
