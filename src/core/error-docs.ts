import { ERROR_CODES, type ErrorCode } from "./error-codes.js";

/** Where the generated operator reference lives (relative to the repository root). */
export const ERROR_CODES_DOC = "docs/error-codes.md";

/** Markdown table cells: a `|` would split the cell, a newline would end the row. */
function cell(s: string): string {
  return s.replaceAll("|", "\\|").replaceAll("\n", " ");
}

/**
 * The operator reference of every error code, rendered from the catalogue (pure: same catalogue, same
 * bytes). `npm run docs:errors` writes it; `test/unit/error-codes.test.ts` fails when the committed copy differs.
 */
export function renderErrorCodesDoc(): string {
  const codes = (Object.keys(ERROR_CODES) as ErrorCode[]).sort();
  const out: string[] = [
    "# Error codes",
    "",
    "<!-- Generated from src/core/error-codes.ts by `npm run docs:errors`. Do not edit by hand. -->",
    "",
    "Every error the agent, its CLI and the registrar report carries one of these stable codes (in logs,",
    "`m2m-agent status` and its degraded reasons, local API answers, registrar answers, dead-letter reasons).",
    "Names are `ERR_<AREA>_<WHAT>`. Protocol numbers (MQTT reason codes, HTTP statuses) never appear in a",
    "code; they travel beside it as details (e.g. `ERR_MQTT_NOT_AUTHORIZED reasonCode=0x87`).",
    "",
    "Retry classes: **transient**: the same call may succeed later, the agent backs off and retries by itself;",
    "**permanent**: retrying the same input fails the same way, something must change first; **fatal**: retrying",
    "makes things worse (a PIN or TPM lockout), the agent stops trying and reports. The class shown is the",
    "default; a few call sites override it for one case (e.g. a registrar answering 503).",
    "",
    `${codes.length} codes.`,
    "",
    "| Code | Retry | What to do |",
    "| --- | --- | --- |",
  ];
  for (const c of codes) {
    const info = ERROR_CODES[c];
    out.push(`| \`${c}\` | ${info.retry} | ${cell(info.action)} |`);
  }
  out.push("");
  return out.join("\n");
}
