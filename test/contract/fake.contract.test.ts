import { expect } from "vitest";
import { FakeKeyProvider, FakeKeyStore } from "../../src/keys/fake/fake-provider.js";
import { describeKeyProviderContract } from "./key-provider-contract.js";

// The fake runs the same contract so unit tests of other modules can trust it behaves like hardware.
describeKeyProviderContract("fake (in-memory)", async () => {
  const store = new FakeKeyStore();
  return {
    make: async () => new FakeKeyProvider({ store }),
    // "Another process" for the fake is a brand-new instance sharing only the store.
    thumbprintFromNewProcess: async () => (await new FakeKeyProvider({ store }).open()).thumbprint,
    assertNotExtractable: async (provider) => {
      const evidence = await provider.evidence();
      // The fake is software: its evidence must say so, so nobody mistakes it for hardware.
      expect(evidence).toEqual({ kind: "fake", software: true });
    },
    propertyRuns: 2000,
    teardown: async () => undefined,
  };
});
