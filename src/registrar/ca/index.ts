export * from "./fleet-ca.js";
