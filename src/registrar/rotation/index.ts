export { type RotationMode, type RotationPolicy, rotationPolicyFrom } from "./policy.js";
export { type RotationSession, RotationSessions } from "./sessions.js";
export { ROTATION_ERRORS, type TpmRotationDeps, tpmRotationRoutes } from "./tpm-rotation.js";
