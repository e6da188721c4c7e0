// Live updates: the page's server-sent-event stream (body data-live) says "changed";
// every element with hx-trigger="changed from:body" then re-reads its part of the page.
(function () {
  "use strict";
  const url = document.body.dataset.live;
  if (!url) {
    return;
  }
  const source = new EventSource(url);
  source.addEventListener("changed", function () {
    htmx.trigger(document.body, "changed");
  });
  source.addEventListener("open", function () {
    document.body.classList.remove("offline");
  });
  source.addEventListener("error", function () {
    document.body.classList.add("offline");
  });
})();
