// A textarea with a line-number gutter and error bands drawn behind the offending lines.

export class YamlEditor {
  constructor(textarea, gutter, marks) {
    this.ta = textarea;
    this.gutter = gutter;
    this.marks = marks;
    this.errors = [];
    this.ta.addEventListener("input", () => this.renderGutter());
    this.ta.addEventListener("scroll", () => this.syncScroll());
    this.renderGutter();
  }

  get value() { return this.ta.value; }
  set value(v) { this.ta.value = v; this.ta.scrollTop = 0; this.setErrors([]); }

  lineHeight() {
    return parseFloat(getComputedStyle(this.ta).lineHeight) || 18;
  }

  renderGutter() {
    const n = this.ta.value.split("\n").length;
    const bad = new Map(this.errors.filter((e) => e.line).map((e) => [e.line, e.message]));
    const frag = document.createDocumentFragment();
    for (let i = 1; i <= n; i++) {
      const s = document.createElement("span");
      s.textContent = String(i);
      s.dataset.line = String(i);
      if (bad.has(i)) { s.className = "err"; s.title = bad.get(i); }
      frag.appendChild(s);
    }
    this.gutter.replaceChildren(frag);
    this.renderMarks();
    this.syncScroll();
  }

  renderMarks() {
    const lh = this.lineHeight();
    const pad = parseFloat(getComputedStyle(this.ta).paddingTop) || 0;
    const byLine = new Map();
    for (const e of this.errors) {
      if (!e.line) continue;
      byLine.set(e.line, (byLine.has(e.line) ? byLine.get(e.line) + "; " : "") + e.message);
    }
    const frag = document.createDocumentFragment();
    for (const [line, msg] of byLine) {
      const band = document.createElement("div");
      band.className = "band";
      band.style.top = `${pad + (line - 1) * lh}px`;
      band.style.height = `${lh}px`;
      band.dataset.line = String(line);
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = `⚠ ${msg}`;
      band.appendChild(note);
      frag.appendChild(band);
    }
    this.marks.replaceChildren(frag);
  }

  syncScroll() {
    this.gutter.scrollTop = this.ta.scrollTop;
    this.marks.style.transform = `translateY(${-this.ta.scrollTop}px)`;
  }

  setErrors(errors) {
    this.errors = errors || [];
    this.renderGutter();
  }

  goto(line) {
    const lines = this.ta.value.split("\n");
    let start = 0;
    for (let i = 0; i < line - 1 && i < lines.length; i++) start += lines[i].length + 1;
    const end = start + (lines[line - 1] || "").length;
    this.ta.focus();
    this.ta.setSelectionRange(start, end);
    this.ta.scrollTop = Math.max(0, (line - 5) * this.lineHeight());
    this.syncScroll();
  }
}
