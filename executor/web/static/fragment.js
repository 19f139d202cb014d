// A part of a page, rendered by the server as the page was (every string escaped), fetched
// and parsed as an inert document: its scripts never run, its nodes are adopted here.
export async function fetchFragment(url, id) {
  let response;
  try {
    response = await fetch(url, { credentials: "same-origin", headers: { accept: "text/html" } });
  } catch {
    return null; // the server is away for a moment: the next refresh tries again
  }
  if (!response.ok) return null;
  const doc = new DOMParser().parseFromString(await response.text(), "text/html");
  const part = id ? doc.getElementById(id) : doc.body;
  return part ? document.adoptNode(part) : null;
}

export async function fetchChildren(url) {
  const body = await fetchFragment(url, null);
  return body ? [...body.childNodes] : null;
}
