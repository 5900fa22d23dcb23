/** Steps reported by `runEnroll` (one progress line each in the CLI). */
export type EnrollStep =
  | "check-state"
  | "open-key"
  | "read-endorsement"
  | "prepare-ak"
  | "begin"
  | "activate-credential"
  | "certify"
  | "build-csr"
  | "submit"
  | "store-state";

export interface EnrollProgress {
  readonly step: EnrollStep;
  readonly status: "start" | "done";
  /** Safe-to-print detail (never a secret). */
  readonly detail?: string;
}

export type ProgressFn = (p: EnrollProgress) => void;

/** Runs one step with start/done progress events. */
export async function step<T>(
  onProgress: ProgressFn | undefined,
  name: EnrollStep,
  fn: () => Promise<T>,
  detail?: (value: T) => string | undefined,
): Promise<T> {
  onProgress?.({ step: name, status: "start" });
  const value = await fn();
  const d = detail?.(value);
  onProgress?.(d === undefined ? { step: name, status: "done" } : { step: name, status: "done", detail: d });
  return value;
}
