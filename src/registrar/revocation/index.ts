export * from "./crl-publisher.js";
export * from "./hook.js";
export * from "./routes.js";
