export * from "./enrolment.js";
export * from "./rotation.js";
