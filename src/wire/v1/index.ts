export * from "./attestation.js";
export * from "./enrolment.js";
export * from "./ingest.js";
export * from "./local-api.js";
export * from "./rotation.js";
