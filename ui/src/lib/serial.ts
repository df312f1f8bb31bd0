/**
 * Keeps keystrokes in order on their way to a terminal.
 *
 * Each Tauri command runs as its own task, so two writes sent at once may
 * reach the shell in either order (typing "answer" fast gave "ansewr").
 * This sends one write at a time and gathers what is typed meanwhile into
 * the next one, so order holds and a burst costs few round trips. A
 * writer made `held` keeps what is typed until [`release`] (keys typed
 * while the shell is still opening are not lost).
 */
export class SerialWriter {
  private pending = "";
  private busy = false;

  constructor(
    private readonly send: (data: string) => Promise<unknown>,
    private readonly onError: (e: unknown) => void = () => {},
    private held = false,
  ) {}

  write(data: string): void {
    this.pending += data;
    if (!this.busy && !this.held) void this.pump();
  }

  /** Starts sending what a held writer kept. */
  release(): void {
    this.held = false;
    if (!this.busy && this.pending) void this.pump();
  }

  private async pump(): Promise<void> {
    this.busy = true;
    while (this.pending) {
      const chunk = this.pending;
      this.pending = "";
      try {
        await this.send(chunk);
      } catch (e) {
        this.onError(e);
      }
    }
    this.busy = false;
  }
}
