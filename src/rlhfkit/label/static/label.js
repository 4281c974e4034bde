// The labelling form works without this script; it only catches an unfinished ranking before
// the round trip and stops a double click from sending the answer twice (the server would
// ignore the copy anyway: both carry the same submission id).
// Never write data into the page with innerHTML: messages go in with textContent.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("label-form");
  if (!form) return;
  const status = document.getElementById("status");
  let sending = false;
  form.addEventListener("submit", (event) => {
    if (sending) { event.preventDefault(); return; }
    const action = event.submitter ? event.submitter.value : "rank";
    if (action === "rank") {
      const missing = [...form.querySelectorAll("select[name^=rank_]")].filter((s) => s.value === "").length;
      if (missing) {
        event.preventDefault();
        status.textContent = `Give every response a rank (${missing} missing). Equal numbers mean a tie.`;
        return;
      }
    }
    sending = true;
    status.textContent = "Saving…";
  });
});
