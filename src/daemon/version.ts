// The version lives in core so both programs (agent and registrar) can print it.
export { agentVersion } from "../core/version.js";
