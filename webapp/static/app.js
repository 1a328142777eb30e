// PIBL demo app script: marks the page as scripted and shows live replica info.
(function () {
  "use strict";

  // The home page lists its own requests and the replica that answered each one.
  function showApiReplica(replica) {
    var item = document.getElementById("api-request");
    if (!item) {
      return;
    }
    item.setAttribute("data-replica", replica);
    var who = item.querySelector(".who");
    if (who) {
      who.textContent = replica;
    }
  }

  function ready() {
    document.body.setAttribute("data-js", "loaded");
    var status = document.getElementById("js-status");
    if (status) {
      status.textContent = "script loaded";
    }

    var live = document.getElementById("live-info");
    if (!live || !window.fetch) {
      return;
    }
    // This request goes through the load balancer too and may be answered
    // by a different replica than the page itself.
    fetch("/api/info", { headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (info) {
        live.textContent =
          "API answered by " + info.replica + " (" + info.requests_served + " requests served)";
        live.setAttribute("data-replica", info.replica);
        showApiReplica(info.replica);
      })
      .catch(function (error) {
        live.textContent = "API unavailable: " + error.message;
        showApiReplica("unavailable (" + error.message + ")");
      });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", ready);
  } else {
    ready();
  }
})();
