import { expect } from "vitest";
import { initSoftHsm, inspectKeyInNewProcess } from "../../hw/softhsm.js";
import { finalizeModule, Pkcs11KeyProvider } from "../../src/keys/pkcs11/index.js";
import { TOKEN_KEY_EVIDENCE } from "../kit/pkcs11-evidence.js";
import { describeKeyProviderContract } from "./key-provider-contract.js";

// The same KeyProvider contract as the TPM and the fake, against a real SoftHSM2 token.
describeKeyProviderContract("pkcs11 (SoftHSM2)", async () => {
  const hsm = await initSoftHsm({ label: "m2m-contract" });
  // SoftHSM reads SOFTHSM2_CONF when the module is first initialised in this process.
  process.env.SOFTHSM2_CONF = hsm.env.SOFTHSM2_CONF;
  const keyLabel = "contract-device";
  const make = async () =>
    new Pkcs11KeyProvider({
      modulePath: hsm.modulePath,
      tokenLabel: hsm.tokenLabel,
      keyLabel,
      pin: { file: hsm.pinFile },
    });
  return {
    make,
    thumbprintFromNewProcess: async () => {
      const view = await inspectKeyInNewProcess(hsm, hsm, keyLabel);
      if (view.thumbprint === undefined) throw new Error("the new process found no public key");
      return view.thumbprint;
    },
    assertNotExtractable: async (provider) => {
      // Read back by an independent process with raw pkcs11js: the token refuses the secret value.
      const view = await inspectKeyInNewProcess(hsm, hsm, keyLabel);
      expect(view.secretRead).toBe("CKR_ATTRIBUTE_SENSITIVE");
      expect(view.attributes).toMatchObject({
        CKA_EXTRACTABLE: false,
        CKA_SENSITIVE: true,
        CKA_NEVER_EXTRACTABLE: true,
        CKA_ALWAYS_SENSITIVE: true,
        CKA_LOCAL: true,
      });
      expect(await provider.evidence()).toEqual(TOKEN_KEY_EVIDENCE);
    },
    propertyRuns: 2000,
    teardown: async () => {
      finalizeModule(hsm.modulePath);
      await hsm.cleanup();
    },
  };
});
