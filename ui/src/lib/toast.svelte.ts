// Messages for failed actions: shown at the bottom, each with its code.
import type { UiError } from "../bindings/UiError";

export interface Toast {
  id: number;
  error: UiError;
}

let next = 1;
export const toasts = $state<{ list: Toast[] }>({ list: [] });

export function showError(error: UiError): void {
  const id = next++;
  // The same message twice is shown once; at most five at a time.
  if (toasts.list.some((t) => t.error.code === error.code && t.error.message === error.message)) return;
  toasts.list.push({ id, error });
  if (toasts.list.length > 5) toasts.list.shift();
  setTimeout(() => dismiss(id), 12_000);
}

export function dismiss(id: number): void {
  toasts.list = toasts.list.filter((t) => t.id !== id);
}
