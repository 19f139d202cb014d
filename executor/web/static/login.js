// A link to a page followed from another site arrives without the session cookie (it is
// SameSite=Strict) and lands here. Ask, same-origin (the cookie goes along this time), and
// go on to the page if this browser is signed in after all.
const form = document.getElementById("sign-in");
const next = form?.dataset.next;
if (next && next !== "/" && !document.querySelector("[role=alert]")) {
  fetch("/login/session", { credentials: "same-origin" })
    .then((response) => (response.ok ? response.json() : { signed_in: false }))
    .then((state) => {
      // Only a page of this server (the server checked `next` too; the browser's URL parser
      // is the last word on where it leads).
      const to = new URL(next, location.origin);
      if (state.signed_in && to.origin === location.origin) location.replace(to.href);
    })
    .catch(() => {});
}
