// Side-by-side diff rendering from the API's rows ({op, a_line, a, b_line, b}).

function cell(tag, text, cls) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  el.textContent = text == null ? "" : text;
  return el;
}

export function renderDiff(container, rows, { context = 3, labels = ["", ""] } = {}) {
  const table = document.createElement("table");
  table.className = "sbs";
  const head = table.createTHead().insertRow();
  head.append(cell("th", ""), cell("th", labels[0]), cell("th", ""), cell("th", labels[1]));
  const body = table.createTBody();
  // Show changed rows plus `context` equal rows around them; collapse the rest.
  const keep = rows.map(() => false);
  rows.forEach((r, i) => {
    if (r.op !== "equal") for (let k = Math.max(0, i - context); k <= Math.min(rows.length - 1, i + context); k++) keep[k] = true;
  });
  let skipped = 0;
  const flush = () => {
    if (!skipped) return;
    const tr = body.insertRow();
    tr.className = "skip";
    const td = cell("td", `… ${skipped} unchanged line${skipped > 1 ? "s" : ""} …`);
    td.colSpan = 4;
    tr.appendChild(td);
    skipped = 0;
  };
  let changes = 0;
  rows.forEach((r, i) => {
    if (!keep[i]) { skipped++; return; }
    flush();
    const tr = body.insertRow();
    tr.className = r.op;
    if (r.op !== "equal") changes++;
    tr.append(
      cell("td", r.a_line, "ln"),
      cell("td", r.a, r.a == null ? "code empty" : "code" + (r.op !== "equal" ? " del" : "")),
      cell("td", r.b_line, "ln"),
      cell("td", r.b, r.b == null ? "code empty" : "code" + (r.op !== "equal" ? " ins" : "")),
    );
  });
  flush();
  container.replaceChildren(changes ? table : cell("p", "No differences.", "muted"));
  return changes;
}
