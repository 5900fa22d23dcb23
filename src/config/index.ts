export {
  auditLogPath,
  configKeys,
  DEFAULT_CONFIG_PATH,
  ENV_PREFIX,
  type LoadConfigOptions,
  type LoadedConfig,
  loadConfig,
  outboxPath,
} from "./load.js";
export {
  type AgentConfig,
  agentConfigSchema,
  OWNER_HANDLE_MAX,
  OWNER_HANDLE_MIN,
  type Pkcs11Config,
  type SecretRef,
  type TpmConfig,
} from "./schema.js";
export { describeSecretRef, type ResolveSecretOptions, resolveSecret } from "./secrets.js";
