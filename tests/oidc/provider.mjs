// A real OpenID Connect provider (the npm package oidc-provider) on loopback, for
// BBX's OIDC tests: client-credentials grants issue JWT access tokens, signed with
// ES256 keys kept in a directory so that a restart with --rotate signs with a new
// key while the old one stays published.
//
//   node provider.mjs --port PORT --keys DIR [--rotate]
//
// Clients (secret "secret" each): "acme-operator" gets tenant acme and the
// provider role "bbx-operator"; "acme-nobody" gets no role. A token's audience is
// the resource asked for (default "urn:bbx"); "urn:bbx:short" gives a token for
// "urn:bbx" that lives 1 second.
// Prints "ready" once it listens.

import Provider from "oidc-provider";
import { generateKeyPair, exportJWK } from "jose";
import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    port: { type: "string" },
    keys: { type: "string" },
    rotate: { type: "boolean", default: false },
  },
});
const port = Number(values.port);
const keysFile = join(values.keys, "keys.json");

async function newKey() {
  const { privateKey } = await generateKeyPair("ES256", { extractable: true });
  const jwk = await exportJWK(privateKey);
  return { ...jwk, kid: `k${Date.now()}${Math.floor(Math.random() * 1e6)}`, alg: "ES256", use: "sig" };
}

let keys = existsSync(keysFile) ? JSON.parse(readFileSync(keysFile, "utf8")) : [];
if (keys.length === 0 || values.rotate) {
  keys = [await newKey(), ...keys];
  writeFileSync(keysFile, JSON.stringify(keys));
}

const claimsOf = {
  "acme-operator": { tenant: "acme", roles: ["bbx-operator"] },
  "acme-nobody": { tenant: "acme", roles: [] },
};

const client = (client_id) => ({
  client_id,
  client_secret: "secret",
  grant_types: ["client_credentials"],
  redirect_uris: [],
  response_types: [],
  token_endpoint_auth_method: "client_secret_post",
  id_token_signed_response_alg: "ES256",
});

const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: Object.keys(claimsOf).map(client),
  jwks: { keys },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => "urn:bbx",
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resource) => ({
        scope: "bbx",
        audience: resource === "urn:bbx:short" ? "urn:bbx" : resource,
        accessTokenFormat: "jwt",
        accessTokenTTL: resource === "urn:bbx:short" ? 1 : 300,
        jwt: { sign: { alg: "ES256" } },
      }),
    },
  },
  extraTokenClaims: (_ctx, token) => claimsOf[token.clientId] ?? {},
});
provider.listen(port, "127.0.0.1", () => console.log("ready"));
