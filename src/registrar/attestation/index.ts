export * from "./gate.js";
export * from "./nonce.js";
export * from "./policy.js";
export * from "./quote-verifier.js";
