// The log view's model: a bounded line buffer, search, and which lines a
// virtualized viewport renders. Pure; unit-tested in logview.test.ts.
import type { LogLine } from "../bindings/LogLine";

/** Lines kept per view; older ones are dropped (and counted). */
export const MAX_LINES = 200_000;

export class LogBuffer {
  lines: LogLine[] = [];
  dropped = 0;

  push(batch: LogLine[]): void {
    for (const l of batch) this.lines.push(l);
    const over = this.lines.length - MAX_LINES;
    if (over > 0) {
      this.lines.splice(0, over);
      this.dropped += over;
    }
  }

  clear(): void {
    this.lines = [];
    this.dropped = 0;
  }

  /** The lines as text, for copy and save. */
  text(withTimestamps: boolean): string {
    return this.lines.map((l) => (withTimestamps && l.ts ? `${l.ts} ${l.text}` : l.text)).join("\n") + "\n";
  }
}

/** Indices of lines containing `q` (case-insensitive). */
export function search(lines: LogLine[], q: string): number[] {
  const needle = q.toLowerCase();
  if (!needle) return [];
  const out: number[] = [];
  for (let i = 0; i < lines.length; i++) if (lines[i].text.toLowerCase().includes(needle)) out.push(i);
  return out;
}

/** A line cut into plain and matching parts, for highlighting. */
export function highlight(text: string, q: string): { text: string; hit: boolean }[] {
  if (!q) return [{ text, hit: false }];
  const lower = text.toLowerCase();
  const needle = q.toLowerCase();
  const parts: { text: string; hit: boolean }[] = [];
  let at = 0;
  for (;;) {
    const i = lower.indexOf(needle, at);
    if (i < 0) break;
    if (i > at) parts.push({ text: text.slice(at, i), hit: false });
    parts.push({ text: text.slice(i, i + needle.length), hit: true });
    at = i + needle.length;
  }
  if (at < text.length || parts.length === 0) parts.push({ text: text.slice(at), hit: false });
  return parts;
}

/** The slice of lines to render for a viewport, with spare rows around it. */
export function windowOf(
  total: number,
  scrollTop: number,
  viewport: number,
  rowHeight: number,
  spare = 20,
): { first: number; last: number; padTop: number; padBottom: number } {
  const first = Math.max(0, Math.floor(scrollTop / rowHeight) - spare);
  const last = Math.min(total, Math.ceil((scrollTop + viewport) / rowHeight) + spare);
  return { first, last, padTop: first * rowHeight, padBottom: Math.max(0, (total - last) * rowHeight) };
}
