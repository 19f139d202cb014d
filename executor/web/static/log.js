// A job's log, drawn from the live log stream's chunks (SPEC §6.2): ANSI colours, foldable
// groups (Buildkite's "--- ", "+++ ", "~~~ " and GitHub's ::group:: / ::endgroup::), line
// numbers with #L links, stderr and harmont-exec's own lines marked, attempts separated,
// timestamps on demand.
//
// Nothing here parses HTML: every piece of text becomes a text node (textContent), so a log
// line holding "<script>" shows as those characters and runs nothing. Colours beyond the 16
// named classes are set through the CSSOM (element.style), which the page's CSP allows,
// never through a style attribute.
//
// A chunk may end in the middle of a line or of an escape sequence: each stream keeps its
// open line and its unfinished escape until the next chunk of that stream.

const SGR_CLASSES = ["black", "red", "green", "yellow", "blue", "magenta", "cyan", "white"];
const STREAMS = ["stdout", "stderr", "meta"];

// ESC [ params letter (CSI), ESC ] ... BEL or ESC \ (OSC), or a lone ESC and one character.
const ESCAPE = /\x1b(?:\[([0-9;:?]*)([@-~])|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])/g;

function xterm256(n) {
  if (n < 16) return null; // named: a class
  if (n >= 232) {
    const v = 8 + (n - 232) * 10;
    return `rgb(${v},${v},${v})`;
  }
  const c = n - 16;
  const level = (x) => (x === 0 ? 0 : 55 + x * 40);
  return `rgb(${level(Math.floor(c / 36))},${level(Math.floor(c / 6) % 6)},${level(c % 6)})`;
}

export class Style {
  constructor() {
    this.reset();
  }
  reset() {
    this.bold = this.dim = this.italic = this.underline = false;
    this.fg = this.bg = null; // a class name ("red", "bright-red", "c5") or an rgb() value
  }
  snapshot() {
    return Object.assign(new Style(), this);
  }
  plain() {
    return !this.bold && !this.dim && !this.italic && !this.underline && !this.fg && !this.bg;
  }
  // Apply one SGR sequence's parameters ("1;31", "38;5;208", "" is reset).
  apply(params) {
    const p = params === "" ? [0] : params.split(/[;:]/).map((x) => (x === "" ? 0 : Number(x)));
    for (let i = 0; i < p.length; i++) {
      const n = p[i];
      if (n === 0) this.reset();
      else if (n === 1) this.bold = true;
      else if (n === 2) this.dim = true;
      else if (n === 3) this.italic = true;
      else if (n === 4) this.underline = true;
      else if (n === 22) this.bold = this.dim = false;
      else if (n === 23) this.italic = false;
      else if (n === 24) this.underline = false;
      else if (n >= 30 && n <= 37) this.fg = SGR_CLASSES[n - 30];
      else if (n >= 90 && n <= 97) this.fg = `bright-${SGR_CLASSES[n - 90]}`;
      else if (n === 39) this.fg = null;
      else if (n >= 40 && n <= 47) this.bg = SGR_CLASSES[n - 40];
      else if (n >= 100 && n <= 107) this.bg = `bright-${SGR_CLASSES[n - 100]}`;
      else if (n === 49) this.bg = null;
      else if ((n === 38 || n === 48) && p[i + 1] === 5) {
        const c = p[i + 2] ?? 0;
        const named = c < 8 ? SGR_CLASSES[c] : c < 16 ? `bright-${SGR_CLASSES[c - 8]}` : null;
        const value = named ?? xterm256(c);
        if (n === 38) this.fg = value;
        else this.bg = value;
        i += 2;
      } else if ((n === 38 || n === 48) && p[i + 1] === 2) {
        const [r, g, b] = [p[i + 2] ?? 0, p[i + 3] ?? 0, p[i + 4] ?? 0];
        const value = `rgb(${r & 255},${g & 255},${b & 255})`;
        if (n === 38) this.fg = value;
        else this.bg = value;
        i += 4;
      }
    }
  }
  // A span for text in this style (a text node when plain).
  wrap(doc, text) {
    if (this.plain()) return doc.createTextNode(text);
    const span = doc.createElement("span");
    const classes = [];
    if (this.bold) classes.push("b");
    if (this.dim) classes.push("dim");
    if (this.italic) classes.push("i");
    if (this.underline) classes.push("u");
    for (const [side, value] of [["fg", this.fg], ["bg", this.bg]]) {
      if (value === null) continue;
      if (value.startsWith("rgb(")) span.style[side === "fg" ? "color" : "backgroundColor"] = value;
      else classes.push(`${side}-${value}`);
    }
    span.className = classes.join(" ");
    span.textContent = text;
    return span;
  }
}

// Split text into [[text, its style], ...] pieces, applying SGR sequences to `style` and
// dropping every other escape. Returns [pieces, rest]: `rest` is an unfinished escape at the
// end, to be put before the next text of the same stream.
export function parseAnsi(text, style) {
  const pieces = [];
  let at = 0;
  let held = "";
  const lastEsc = text.lastIndexOf("\x1b");
  if (lastEsc >= 0) {
    const tail = text.slice(lastEsc);
    ESCAPE.lastIndex = 0;
    const m = ESCAPE.exec(tail);
    if (!m || m.index !== 0) {
      // unfinished (or a bare ESC at the very end): hold it, unless it is clearly garbage
      if (tail.length < 64) {
        held = tail;
        text = text.slice(0, lastEsc);
      }
    }
  }
  ESCAPE.lastIndex = 0;
  let m;
  while ((m = ESCAPE.exec(text)) !== null) {
    if (m.index > at) pieces.push([text.slice(at, m.index), style.snapshot()]);
    if (m[2] === "m") style.apply(m[1] ?? "");
    at = ESCAPE.lastIndex;
  }
  if (at < text.length) pieces.push([text.slice(at), style.snapshot()]);
  return [pieces, held];
}

const BUILDKITE = /^(---|\+\+\+|~~~) (.*)$/;
const GH_GROUP = /^::group::(.*)$/;
const GH_END = /^::endgroup::\s*$/;

// The log: give it the chunks in order (`append`), or all of them again (`reset` then
// `append`) after earlier output was loaded.
export class LogView {
  constructor(container, { doc = document } = {}) {
    this.root = container;
    this.doc = doc;
    this.reset();
  }
  reset() {
    this.root.replaceChildren();
    this.lines = 0;
    this.attempt = null;
    this.group = null; // the <div class="group-body"> lines go into, or null
    this.open = {}; // stream -> {line element, text so far, style, held escape}
    for (const s of STREAMS) this.open[s] = { line: null, text: "", style: new Style(), held: "" };
  }
  target() {
    return this.group ?? this.root;
  }
  append(chunks) {
    for (const chunk of chunks) this.addChunk(chunk);
  }
  addChunk(chunk) {
    const stream = STREAMS[chunk.stream_kind] ?? "stdout";
    if (chunk.attempt !== undefined && chunk.attempt !== this.attempt) {
      this.closeAll();
      if (this.attempt !== null || chunk.attempt > 1) this.separator(chunk.attempt);
      this.attempt = chunk.attempt;
      this.group = null;
    }
    const state = this.open[stream];
    let text = state.held + chunk.content;
    state.held = "";
    const parts = text.split("\n");
    parts.forEach((part, i) => {
      const last = i === parts.length - 1;
      if (last && part === "") return; // the chunk ended its line
      this.write(stream, state, part, chunk.ts);
      if (!last) this.finish(stream, state);
    });
  }
  write(stream, state, part, ts) {
    // A carriage return (progress bars) starts the line over.
    const cr = part.lastIndexOf("\r");
    if (cr >= 0) {
      if (state.line) {
        state.line.lastChild.replaceChildren();
        state.text = "";
      }
      part = part.slice(cr + 1);
    }
    if (!state.line) state.line = this.newLine(stream, ts);
    const body = state.line.lastChild; // the line's text span
    if (!part.includes("\x1b") && state.style.plain()) {
      // the usual line: no escape, no colour in force
      body.appendChild(this.doc.createTextNode(part));
      state.text += part;
      return;
    }
    const [pieces, held] = parseAnsi(part, state.style);
    state.held = held;
    for (const [text, style] of pieces) {
      body.appendChild(style.wrap(this.doc, text));
      state.text += text;
    }
  }
  finish(stream, state) {
    if (!state.line) state.line = this.newLine(stream, null);
    const line = state.line;
    const text = state.text;
    state.line = null;
    state.text = "";
    this.fold(line, text);
  }
  // A finished line that opens or closes a group.
  fold(line, text) {
    let m;
    if ((m = GH_END.exec(text))) {
      line.classList.add("group-end");
      this.group = null;
      return;
    }
    const header = (m = GH_GROUP.exec(text))
      ? [m[1], false]
      : (m = BUILDKITE.exec(text))
        ? [m[2], m[1] === "+++"]
        : null;
    if (!header) return;
    // A header ends the group before it (groups do not nest) and shows its title alone.
    const details = this.doc.createElement("details");
    details.className = "group";
    if (header[1]) details.open = true;
    const summary = this.doc.createElement("summary");
    const place = line.parentNode === this.group ? this.group.parentNode : line;
    if (place === line) line.replaceWith(details);
    else place.after(details);
    line.lastChild.textContent = header[0];
    summary.appendChild(line);
    details.appendChild(summary);
    const body = this.doc.createElement("div");
    body.className = "group-body";
    details.appendChild(body);
    this.group = body;
  }
  closeAll() {
    for (const s of STREAMS) if (this.open[s].line) this.finish(s, this.open[s]);
  }
  newLine(stream, ts) {
    const n = ++this.lines;
    const line = this.doc.createElement("div");
    line.className = `line ${stream}`;
    line.id = `L${n}`;
    const num = this.doc.createElement("a");
    num.className = "ln";
    num.href = `#L${n}`;
    num.textContent = String(n);
    line.appendChild(num);
    if (ts !== null && ts !== undefined) {
      const time = this.doc.createElement("span");
      time.className = "ts";
      time.textContent = new Date(ts / 1e6).toISOString().slice(11, 23);
      line.appendChild(time);
    }
    const text = this.doc.createElement("span");
    text.className = "text";
    line.appendChild(text);
    this.target().appendChild(line);
    return line;
  }
  separator(attempt) {
    const sep = this.doc.createElement("div");
    sep.className = "attempt-sep";
    sep.textContent = `attempt ${attempt}`;
    this.root.appendChild(sep);
  }
}
