import { describe, expect, it } from "vitest";
import { SerialWriter } from "./serial";

describe("SerialWriter", () => {
  it("delivers in typing order even when replies come back out of order", async () => {
    const got: string[] = [];
    let delay = 30;
    const w = new SerialWriter(async (d) => {
      // Earlier sends answer later, as concurrent commands may.
      const wait = delay;
      delay = Math.max(0, delay - 10);
      await new Promise((r) => setTimeout(r, wait));
      got.push(d);
    });
    for (const ch of "answer") w.write(ch);
    await new Promise((r) => setTimeout(r, 120));
    expect(got.join("")).toBe("answer");
    // The first key goes alone; the rest, typed while it was in flight, go together.
    expect(got).toEqual(["a", "nswer"]);
  });
  it("keeps going after a failed write and reports it", async () => {
    const got: string[] = [];
    const errors: unknown[] = [];
    const w = new SerialWriter(
      async (d) => {
        if (d === "x") throw new Error("gone");
        got.push(d);
      },
      (e) => errors.push(e),
    );
    w.write("x");
    w.write("y");
    await new Promise((r) => setTimeout(r, 10));
    expect(got).toEqual(["y"]);
    expect(errors.length).toBe(1);
  });
  it("keeps what is typed while held and sends it on release", async () => {
    const got: string[] = [];
    const w = new SerialWriter(async (d) => void got.push(d), undefined, true);
    w.write("ls");
    w.write(" /");
    await new Promise((r) => setTimeout(r, 10));
    expect(got).toEqual([]);
    w.release();
    await new Promise((r) => setTimeout(r, 10));
    expect(got).toEqual(["ls /"]);
  });
});
