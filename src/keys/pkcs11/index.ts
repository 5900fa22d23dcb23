// Public surface of the PKCS#11 backend.

export {
  createEngineSecureContext,
  type EngineKeyOptions,
  engineKeyUri,
  engineTlsClient,
} from "./engine-tls.js";
export { ckrOf, finalizeAllModules, finalizeModule, loadModule } from "./module.js";
export { describePinSource, type PinSource, readPin } from "./pin.js";
export { Pkcs11KeyProvider, type Pkcs11KeyProviderConfig } from "./provider.js";
export { spkiFromEcPoint, spkiFromRsa } from "./public-key.js";
export { formatPkcs11Uri, type Pkcs11UriParts, parsePkcs11Uri, pctEncodePathValue } from "./uri.js";
