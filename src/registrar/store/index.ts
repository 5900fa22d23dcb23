export * from "./migrations.js";
export * from "./open.js";
export * from "./pg-store.js";
export * from "./sqlite-store.js";
export * from "./store.js";
