import { inspect } from "node:util";

const REDACTED = "<redacted>";

/**
 * A secret value (PIN, bootstrap token, access token, credential secret) that refuses to print.
 * `toString`, `toJSON`, template literals and `util.inspect` all show `<redacted>`; the only way to
 * the value is the explicit `reveal()`, which makes every use greppable in review.
 */
export class Secret<T extends string | Uint8Array = string> {
  readonly #value: T;

  constructor(value: T) {
    this.#value = value;
  }

  reveal(): T {
    return this.#value;
  }

  get length(): number {
    return this.#value.length;
  }

  toString(): string {
    return REDACTED;
  }

  toJSON(): string {
    return REDACTED;
  }

  [Symbol.toPrimitive](): string {
    return REDACTED;
  }

  [inspect.custom](): string {
    return `Secret(${REDACTED})`;
  }
}
