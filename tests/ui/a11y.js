// Accessibility checks run inside the page (arguments: none). Returns
// {unnamed: [...controls without an accessible name], contrast: [...text below WCAG AA]}.
function parseColor(s) {
  const m = s.match(/rgba?\(([\d.]+),?\s*([\d.]+),?\s*([\d.]+)(?:,?\s*\/?\s*([\d.]+))?\)/);
  return m ? [Number(m[1]), Number(m[2]), Number(m[3]), m[4] === undefined ? 1 : Number(m[4])] : null;
}
function luminance([r, g, b]) {
  const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
}
function ratio(a, b) {
  const [x, y] = [luminance(a), luminance(b)].sort((p, q) => q - p);
  return (x + 0.05) / (y + 0.05);
}
// the background colours behind an element: its own or its nearest opaque ancestor's; a
// gradient (routing cells) contributes every colour stop
function backgrounds(el) {
  for (let e = el; e; e = e.parentElement) {
    const cs = getComputedStyle(e);
    const stops = (cs.backgroundImage.match(/rgba?\([^)]*\)/g) || []).map(parseColor);
    if (stops.length) return stops;
    const bg = parseColor(cs.backgroundColor);
    if (bg && bg[3] > 0.5) return [bg];
  }
  return [[255, 255, 255, 1]];
}
function visible(el) {
  const r = el.getBoundingClientRect();
  const cs = getComputedStyle(el);
  return r.width > 1 && r.height > 1 && cs.visibility !== "hidden" && Number(cs.opacity) > 0;
}
function accessibleName(el) {
  if (el.getAttribute("aria-label")) return el.getAttribute("aria-label");
  const by = el.getAttribute("aria-labelledby");
  if (by) return by.split(/\s+/).map((id) => document.getElementById(id)?.textContent || "").join(" ").trim();
  if (el.id) {
    const label = document.querySelector(`label[for="${el.id}"]`);
    if (label) return label.textContent.trim();
  }
  const wrapping = el.closest("label");
  if (wrapping) return wrapping.textContent.trim();
  if (el.tagName === "BUTTON" || el.tagName === "SUMMARY") return el.textContent.trim();
  return "";
}
const unnamed = [...document.querySelectorAll("input, textarea, select, button, summary, [role=log], canvas, table")]
  .filter((el) => el.type !== "hidden" && !(el.tagName === "TABLE" && el.caption) && !accessibleName(el))
  .map((el) => el.outerHTML.slice(0, 120));
const contrast = [];
for (const el of document.querySelectorAll("body *")) {
  const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
  if (!own || !visible(el) || el.disabled || el.closest("[disabled]")) continue;
  const cs = getComputedStyle(el);
  const fg = parseColor(cs.color);
  const size = parseFloat(cs.fontSize);
  const large = size >= 24 || (size >= 18.66 && Number(cs.fontWeight) >= 700);
  const need = large ? 3 : 4.5;
  const worst = Math.min(...backgrounds(el).map((bg) => ratio(fg, bg)));
  if (worst < need) contrast.push(`${el.tagName}#${el.id}.${el.className} "${el.textContent.trim().slice(0, 30)}": ${worst.toFixed(2)} < ${need}`);
}
return { unnamed, contrast };
