// The web view's one script: makes the server-rendered pages live (no framework, nothing
// fetched from elsewhere). The pages work without it; with it, the list's rows and a flow's
// graph, task panel and event log follow Server-Sent Events from the view.
(function () {
  "use strict";

  var body = document.body;
  var live = document.getElementById("live");

  function say(text) {
    if (live && live.textContent !== text) live.textContent = text;
  }

  function stream(url, handlers) {
    var source = new EventSource(url);
    source.onopen = function () { say("Live: changes appear as they happen."); };
    source.onerror = function () { say("Connection lost: reconnecting…"); };
    Object.keys(handlers).forEach(function (name) {
      source.addEventListener(name, function (event) {
        handlers[name](JSON.parse(event.data));
      });
    });
    window.addEventListener("pagehide", function () { source.close(); });
    return source;
  }

  function element(html) {
    var template = document.createElement("template");
    template.innerHTML = html;
    return template.content.firstElementChild;
  }

  // kubectl's AGE, from each <time datetime>: 45s, 12m, 3h, 2d.
  function age(iso) {
    var start = Date.parse(iso);
    if (isNaN(start)) return "";
    var s = Math.max(0, Math.floor((Date.now() - start) / 1000));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m";
    if (s < 86400) return Math.floor(s / 3600) + "h";
    return Math.floor(s / 86400) + "d";
  }

  function refreshAges(root) {
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      var text = age(t.getAttribute("datetime"));
      if (text && t.textContent !== text) t.textContent = text;
    });
  }

  // -- the list ---------------------------------------------------------------------------------

  function flowsPage() {
    var rows = document.getElementById("flow-rows");
    var count = document.getElementById("flow-count");
    var empty = '<tr class="empty"><td colspan="6">No flows match.</td></tr>';

    function recount() {
      var n = rows.querySelectorAll("tr[data-uid]").length;
      count.textContent = n === 1 ? "1 flow" : n + " flows";
      var placeholder = rows.querySelector("tr.empty");
      if (n === 0 && !placeholder) rows.innerHTML = empty;
      if (n > 0 && placeholder) placeholder.remove();
    }

    function place(row) {
      var created = row.getAttribute("data-created") || "";
      var others = rows.querySelectorAll("tr[data-uid]");
      for (var i = 0; i < others.length; i++) {
        if ((others[i].getAttribute("data-created") || "") < created) {
          rows.insertBefore(row, others[i]);
          return;
        }
      }
      rows.appendChild(row);
    }

    stream(body.dataset.stream, {
      snapshot: function (data) {
        rows.innerHTML = data.html;
        count.textContent = data.count;
      },
      row: function (data) {
        var old = rows.querySelector('tr[data-uid="' + CSS.escape(data.uid) + '"]');
        if (data.html === null) {
          if (old) old.remove();
        } else {
          var row = element("<table><tbody>" + data.html + "</tbody></table>");
          row = row.querySelector("tr");
          if (old) old.replaceWith(row); else place(row);
        }
        recount();
      },
    });
    setInterval(function () { refreshAges(rows); }, 5000);
  }

  // -- a flow -----------------------------------------------------------------------------------

  function flowPage() {
    var box = document.getElementById("flow-live");
    var log = document.getElementById("log");
    var task = body.dataset.task || "";
    var lastSeq = 0;
    var timer = null;
    var busy = false;
    var again = false;

    function refresh() {
      if (busy) { again = true; return Promise.resolve(); }
      busy = true;
      var url = body.dataset.fragment + (task ? "?task=" + encodeURIComponent(task) : "");
      return fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (response) { return response.ok ? response.text() : null; })
        .then(function (html) {
          if (html === null) return;
          var focused = document.activeElement && document.activeElement.id;
          box.innerHTML = html;
          if (focused && document.getElementById(focused)) {
            document.getElementById(focused).focus({ preventScroll: true });
          }
        })
        .catch(function () { say("Could not refresh the flow: retrying on the next change."); })
        .finally(function () {
          busy = false;
          if (again) { again = false; schedule(); }
        });
    }

    function schedule() {
      clearTimeout(timer);
      timer = setTimeout(refresh, 150);
    }

    // A task event recolours its node at once; the status write that follows re-renders it.
    function mark(name, status, attempt) {
      var node = box.querySelector('a.node[data-task="' + CSS.escape(name) + '"]');
      if (!node || !status) return;
      node.className = node.className.replace(/\bst-[A-Z_]+\b/g, "") + " st-" + status;
      var badge = node.querySelector(".badge");
      if (badge) {
        badge.className = "badge st-" + status;
        badge.textContent = status.replace(/_/g, " ");
      }
      var meta = node.querySelector(".node-meta");
      if (meta && typeof attempt === "number") {
        meta.textContent = meta.textContent.replace(/attempt \d+/, "attempt " + attempt);
      }
    }

    stream(body.dataset.stream, {
      log: function (data) {
        if (typeof data.seq === "number") {
          if (data.seq <= lastSeq) return; // replayed again after a reconnect
          lastSeq = data.seq;
        }
        log.appendChild(element(data.html));
        while (log.children.length > 2000) log.firstElementChild.remove();
        if (data.task) mark(data.task, data.status, data.attempt);
      },
      logerror: function (data) { say(data.message); },
      changed: schedule,
    });

    box.addEventListener("click", function (event) {
      var link = event.target.closest("a.node");
      if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) {
        return;
      }
      event.preventDefault();
      task = link.dataset.task;
      history.pushState({ task: task }, "", link.href);
      refresh().then(function () {
        var heading = document.getElementById("task-h");
        var panel = document.getElementById("task");
        if (panel) panel.scrollIntoView({ block: "nearest" });
        if (heading) { heading.setAttribute("tabindex", "-1"); heading.focus({ preventScroll: true }); }
      });
    });
    window.addEventListener("popstate", function () {
      task = new URLSearchParams(location.search).get("task") || "";
      refresh();
    });
  }

  if (body.dataset.page === "flows") flowsPage();
  if (body.dataset.page === "flow") flowPage();
})();
