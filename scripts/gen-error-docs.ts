import { writeFileSync } from "node:fs";
import { ERROR_CODES_DOC, renderErrorCodesDoc } from "../src/core/error-docs.js";

// `npm run docs:errors`: writes the operator reference from the catalogue (run from the repository root).
writeFileSync(ERROR_CODES_DOC, renderErrorCodesDoc());
process.stdout.write(`wrote ${ERROR_CODES_DOC}\n`);
