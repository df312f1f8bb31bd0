import { describe, expect, it } from "vitest";
import { LogBuffer, MAX_LINES, highlight, search, windowOf } from "./logview";

const line = (text: string, stream = "stdout") => ({ stream, ts: "2026-12-02T19:00:00Z", text });

describe("LogBuffer", () => {
  it("keeps at most MAX_LINES, dropping the oldest and counting them", () => {
    const b = new LogBuffer();
    b.push(Array.from({ length: MAX_LINES + 5 }, (_, i) => line(`l${i}`)));
    expect(b.lines.length).toBe(MAX_LINES);
    expect(b.dropped).toBe(5);
    expect(b.lines[0].text).toBe("l5");
  });
  it("gives the text with or without timestamps", () => {
    const b = new LogBuffer();
    b.push([line("a"), line("b")]);
    expect(b.text(false)).toBe("a\nb\n");
    expect(b.text(true)).toBe("2026-12-02T19:00:00Z a\n2026-12-02T19:00:00Z b\n");
  });
});

describe("search and highlight", () => {
  it("finds lines case-insensitively", () => {
    expect(search([line("Error one"), line("fine"), line("an error")], "error")).toEqual([0, 2]);
    expect(search([line("x")], "")).toEqual([]);
  });
  it("cuts a line into parts around every hit", () => {
    expect(highlight("a Foo b foo", "foo")).toEqual([
      { text: "a ", hit: false },
      { text: "Foo", hit: true },
      { text: " b ", hit: false },
      { text: "foo", hit: true },
    ]);
    expect(highlight("none", "x")).toEqual([{ text: "none", hit: false }]);
  });
});

describe("windowOf", () => {
  it("renders only the visible rows and spares, padding the rest", () => {
    const w = windowOf(100_000, 50_000 * 18, 540, 18, 10);
    expect(w.first).toBe(49_990);
    expect(w.last).toBe(50_040);
    expect(w.padTop).toBe(49_990 * 18);
    expect(w.padBottom).toBe((100_000 - 50_040) * 18);
  });
  it("stays inside the list at both ends", () => {
    expect(windowOf(5, 0, 1000, 18).first).toBe(0);
    expect(windowOf(5, 0, 1000, 18).last).toBe(5);
  });
});
