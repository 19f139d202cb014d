// The builds list, live: its rows are read again every 2 seconds while the tab is visible
// (the server renders them, escaped, as it rendered the page).
import { fetchFragment } from "./fragment.js";

const table = document.getElementById("builds");
if (table && table.dataset.live === "yes") {
  const refresh = async () => {
    if (document.hidden) return;
    const rows = await fetchFragment(`${location.pathname}?part=rows`, "build-rows");
    if (rows) document.getElementById("build-rows").replaceWith(rows);
  };
  setInterval(refresh, 2000);
  document.addEventListener("visibilitychange", refresh);
}
